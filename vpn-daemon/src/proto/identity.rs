//! The identity feed's wire format: who holds which VPN address, as a
//! snapshot and as a stream of numbered changes (server-sent events), and
//! the shared secret that opens it. Pure: the journal that numbers the
//! changes is `session::journal`'s, the HTTPS server `identity`'s.
//!
//! A consumer (a web proxy, a SIEM) reads `GET /v1/mappings` once, or
//! straight away `GET /v1/changes`: that stream starts with a `snapshot`
//! event when the consumer has no position (or one the gateway no longer
//! has), then sends each change as an `add`, `update` or `remove` event.
//! Every event's `id:` is `EPOCH-SEQ`; a consumer that reconnects sends
//! the last one it saw (`Last-Event-ID`, as browsers' EventSource do) and
//! gets exactly the changes after it, in order. `EPOCH` changes when vpnd
//! restarts, so positions from before a restart get a fresh snapshot.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

/// One VPN session's addresses and who holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub session_id: u64,
    pub user: String,
    /// The tunnel group the user logged in to.
    pub group: String,
    /// The user's directory groups (LDAP), if any.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The group policy in force, if any.
    pub policy: Option<String>,
    pub address: Ipv4Addr,
    pub address6: Option<Ipv6Addr>,
    /// RFC 3339 time of login.
    pub since: String,
}

/// The mappings at one moment, by session and by address: both ends of
/// the feed keep one (the journal its state, a consumer its copy), and a
/// lookup by address costs one hash probe however many sessions there are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingSet {
    by_session: BTreeMap<u64, Mapping>,
    by_addr: HashMap<IpAddr, u64>,
}

impl MappingSet {
    /// Applies `op` on `m`.
    pub fn apply(&mut self, op: Op, m: Mapping) {
        if let Some(old) = self.by_session.remove(&m.session_id) {
            self.unindex(&old);
        }
        if op != Op::Remove {
            self.by_addr.insert(IpAddr::V4(m.address), m.session_id);
            if let Some(a) = m.address6 {
                self.by_addr.insert(IpAddr::V6(a), m.session_id);
            }
            self.by_session.insert(m.session_id, m);
        }
    }

    fn unindex(&mut self, m: &Mapping) {
        for a in std::iter::once(IpAddr::V4(m.address)).chain(m.address6.map(IpAddr::V6)) {
            if self.by_addr.get(&a) == Some(&m.session_id) {
                self.by_addr.remove(&a);
            }
        }
    }

    /// Everything `mappings` says, nothing else.
    pub fn replace(&mut self, mappings: Vec<Mapping>) {
        *self = MappingSet::default();
        for m in mappings {
            self.apply(Op::Add, m);
        }
    }

    /// The mapping that holds `a`.
    pub fn lookup(&self, a: IpAddr) -> Option<&Mapping> {
        self.by_session.get(self.by_addr.get(&a.to_canonical())?)
    }

    /// Every mapping, by session id.
    pub fn all(&self) -> Vec<Mapping> {
        self.by_session.values().cloned().collect()
    }
}

/// What happened to a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A session got its addresses (login, or restored at start).
    Add,
    /// Its policy changed (reload, schedule, RADIUS CoA).
    Update,
    /// It ended: its addresses are free.
    Remove,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Update => "update",
            Op::Remove => "remove",
        }
    }
}

/// A numbered change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub op: Op,
    pub mapping: Mapping,
}

/// Every mapping at one moment: the state after change `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub epoch: String,
    pub seq: u64,
    pub mappings: Vec<Mapping>,
}

/// A position in the stream: `EPOCH-SEQ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

impl Position {
    /// Reads `EPOCH-SEQ`; anything else is no position.
    pub fn parse(s: &str) -> Option<Position> {
        let (epoch, seq) = s.trim().rsplit_once('-')?;
        if epoch.is_empty() || epoch.len() > 32 || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Position {
            epoch: epoch.to_owned(),
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

/// A server-sent event: `id`, `event` and one `data` line of JSON.
pub fn sse_event(id: &Position, event: &str, data: &impl Serialize) -> String {
    // serde_json never writes a raw newline, so the data is one line.
    let json = serde_json::to_string(data).unwrap_or_else(|_| "null".into());
    format!("id: {id}\nevent: {event}\ndata: {json}\n\n")
}

/// A parsed server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Reads server-sent events out of a stream fed line by line (the
/// consumer's side). Comments (keepalives) and `retry:` are skipped.
#[derive(Debug, Default)]
pub struct SseReader {
    current: SseEvent,
    has_data: bool,
}

impl SseReader {
    /// Feeds one line (without its line end); returns an event when the
    /// line ends one.
    pub fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let ev = std::mem::take(&mut self.current);
            let had = std::mem::take(&mut self.has_data);
            return had.then_some(ev);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

/// Whether the `Authorization` header `header` carries `secret`: as a
/// bearer token, or as the password of HTTP basic authentication (any
/// user name). Compared in constant time, over SHA-256 digests so the
/// length does not show either.
pub fn authorized(header: Option<&str>, secret: &str) -> bool {
    use base64::Engine as _;
    use subtle::ConstantTimeEq as _;
    let Some(h) = header else {
        return false;
    };
    let offered = match h.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim().to_owned(),
        Some((scheme, cred)) if scheme.eq_ignore_ascii_case("basic") => {
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(cred.trim()) else {
                return false;
            };
            let Ok(text) = String::from_utf8(raw) else {
                return false;
            };
            match text.split_once(':') {
                Some((_, password)) => password.to_owned(),
                None => return false,
            }
        }
        _ => return false,
    };
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    digest(&offered)
        .as_ref()
        .ct_eq(digest(secret).as_ref())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        Mapping {
            session_id: 7,
            user: "alice".into(),
            group: "staff".into(),
            groups: vec!["vpn-eng".into()],
            policy: Some("eng".into()),
            address: "198.19.0.37".parse().unwrap(),
            address6: Some("fd00:1::25".parse().unwrap()),
            since: "2026-12-04T23:00:00Z".into(),
        }
    }

    #[test]
    fn events_read_back_as_written() {
        let pos = Position {
            epoch: "a1b2".into(),
            seq: 42,
        };
        let change = Change {
            seq: 42,
            op: Op::Add,
            mapping: mapping(),
        };
        let text = format!(
            ": keepalive\n\nretry: 5000\n\n{}",
            sse_event(&pos, "add", &change)
        );
        let mut r = SseReader::default();
        let events: Vec<SseEvent> = text.lines().filter_map(|l| r.line(l)).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].id.as_deref(), Some("a1b2-42"));
        assert_eq!(events[0].event, "add");
        let back: Change = serde_json::from_str(&events[0].data).unwrap();
        assert_eq!(back, change);
        assert_eq!(Position::parse("a1b2-42"), Some(pos));
    }

    #[test]
    fn positions_that_are_not() {
        for bad in ["", "42", "a1b2-", "-42", "xyz-1", "a1b2-1x", "a1b2--1"] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_set_finds_either_address_and_forgets_both() {
        let mut s = MappingSet::default();
        s.apply(Op::Add, mapping());
        let user = |s: &MappingSet, a: &str| s.lookup(a.parse().unwrap()).map(|m| m.user.clone());
        assert_eq!(user(&s, "198.19.0.37").as_deref(), Some("alice"));
        assert_eq!(user(&s, "fd00:1::25").as_deref(), Some("alice"));
        assert_eq!(user(&s, "::ffff:198.19.0.37").as_deref(), Some("alice"));
        assert_eq!(user(&s, "198.19.0.38"), None);
        // The address goes to bob: alice's entry no longer claims it.
        s.apply(Op::Remove, mapping());
        let mut bob = mapping();
        bob.session_id = 8;
        bob.user = "bob".into();
        bob.address6 = None;
        s.apply(Op::Add, bob.clone());
        assert_eq!(user(&s, "198.19.0.37").as_deref(), Some("bob"));
        assert_eq!(user(&s, "fd00:1::25"), None);
        s.replace(vec![]);
        assert_eq!(user(&s, "198.19.0.37"), None);
        assert!(s.all().is_empty());
    }

    #[test]
    fn the_secret_as_bearer_or_basic_password_and_nothing_else() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let secret = "s3cret-token-0123456789";
        assert!(authorized(Some(&format!("Bearer {secret}")), secret));
        assert!(authorized(Some(&format!("bearer  {secret}")), secret));
        assert!(authorized(
            Some(&format!("Basic {}", b64(&format!("squid:{secret}")))),
            secret
        ));
        for bad in [
            None,
            Some(String::new()),
            Some(format!("Bearer {secret}x")),
            Some("Bearer s3cret".to_string()),
            Some(format!("Token {secret}")),
            Some(format!("Basic {}", b64(secret))),
            Some("Basic !!!".to_string()),
            Some(format!("Basic {}", b64("squid:wrong"))),
        ] {
            assert!(!authorized(bad.as_deref(), secret), "{bad:?}");
        }
    }
}
