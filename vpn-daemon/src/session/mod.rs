//! Sessions: what a successful login creates, and what a tunnel attaches to.
//!
//! A session outlives its tunnels. It starts at login (cookie issued,
//! address reserved, BPF entry installed), gets a tunnel at each CONNECT
//! (a new CONNECT with the same cookie takes the session over from an older
//! tunnel), and ends at logout, admin disconnect, session or idle timeout,
//! or when no tunnel has been attached for `disconnected_timeout_secs`.

pub mod dynamic_auth;
pub mod journal;
pub mod manager;
pub mod persist;
pub mod pool;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime},
};

use parking_lot::{Mutex, RwLock};
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::session::pool::Lease;

pub use crate::events::EndReason;

/// Why a tunnel is being closed from the server side.
#[derive(Debug, Clone)]
pub enum Kick {
    /// End the session: tell the client (TERMINATE) and close.
    Terminate(EndReason),
    /// A newer CONNECT took the session over: close quietly.
    Replaced,
}

/// The live tunnel of a session.
pub struct TunnelHandle {
    pub generation: u64,
    /// Packets routed to this client.
    pub to_client: mpsc::Sender<Vec<u8>>,
    pub kick: Option<oneshot::Sender<Kick>>,
}

/// Which group policy a session has and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyBinding {
    /// The user's own policy (the local user's `group_policy`, RADIUS
    /// Filter-Id); `None` = the default applies.
    pub own: Option<String>,
    /// The policy in force (own or default); `None` = no policy.
    pub effective: Option<String>,
    /// Its installed id; 0 = none.
    pub id: u32,
    /// Its proxy auto-config URL, pushed at CONNECT.
    pub proxy_pac: Option<String>,
}

/// The tunnel side of a session, behind one lock.
#[derive(Default)]
pub struct TunnelSlot {
    pub generation: u64,
    pub handle: Option<TunnelHandle>,
    /// The client's public address and port of the latest tunnel.
    pub peer: Option<SocketAddr>,
    /// When the last tunnel went away (or the session was created, before
    /// the first CONNECT). `None` while a tunnel is up.
    pub down_since: Option<Instant>,
}

pub struct Session {
    pub id: u64,
    pub user: String,
    pub group: String,
    /// The group policy in force, changed by reloads.
    pub policy: Mutex<PolicyBinding>,
    /// Its upload and download limits in bit/s (0 = none), read per packet
    /// by the pacers (`transport/pacing.rs`).
    pub rate_up_bps: AtomicU64,
    pub rate_down_bps: AtomicU64,
    pub lease: Lease,
    /// The client's public address at login (RADIUS Calling-Station-Id).
    pub login_from: IpAddr,
    pub mac: [u8; 6],
    pub created: SystemTime,
    pub started: Instant,
    /// Milliseconds after `started` of the last data packet either way.
    pub last_activity_ms: AtomicU64,
    pub tunnel: Mutex<TunnelSlot>,
    /// Packets from the client whose source was not one of the session's
    /// own addresses, dropped ([`Session::owns_source`]).
    pub spoofed_dropped: AtomicU64,
    /// Timeouts of its own, shorter than the configured ones (RADIUS
    /// Session-Timeout and Idle-Timeout).
    pub own_timeouts: OwnTimeouts,
    /// RADIUS Class values from the Access-Accept, for accounting.
    pub class: Vec<Vec<u8>>,
    /// Directory groups (LDAP), for the identity feed.
    pub groups: Vec<String>,
    /// Who authenticated it.
    pub auth_source: crate::auth::AuthSource,
    /// See [`Session::span`].
    pub span: tracing::Span,
}

/// A session's own limits over the configured [`Timeouts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnTimeouts {
    pub session: Option<Duration>,
    pub idle: Option<Duration>,
}

impl OwnTimeouts {
    /// `t` with these applied: the shorter of each.
    pub fn apply(&self, t: &Timeouts) -> Timeouts {
        let min = |a: Duration, b: Option<Duration>| b.map_or(a, |b| a.min(b));
        Timeouts {
            session: min(t.session, self.session),
            idle: match (t.idle.is_zero(), self.idle) {
                (true, own) => own.unwrap_or_default(),
                (false, own) => min(t.idle, own),
            },
            disconnected: t.disconnected,
        }
    }
}

/// A session's span ([`Session::span`]), made once at login, outside any
/// other span.
pub fn session_span(id: u64, user: &str, v4: std::net::Ipv4Addr) -> tracing::Span {
    tracing::info_span!(parent: None, "session", id, user = %user, vpn = %v4)
}

/// The limits [`Session::expiry`] checks.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Maximum session length.
    pub session: Duration,
    /// Without traffic for this long the session ends; zero = never.
    pub idle: Duration,
    /// Without a tunnel for this long the session ends.
    pub disconnected: Duration,
}

impl Session {
    /// Why the session must end at `now`, if it must.
    pub fn expiry(&self, t: &Timeouts, now: Instant) -> Option<EndReason> {
        let t = &self.own_timeouts.apply(t);
        let age = now.saturating_duration_since(self.started);
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        if age >= t.session {
            Some(EndReason::SessionTimeout)
        } else if !t.idle.is_zero() && age.saturating_sub(last) >= t.idle {
            Some(EndReason::IdleTimeout)
        } else if self
            .tunnel
            .lock()
            .down_since
            .is_some_and(|d| now.saturating_duration_since(d) >= t.disconnected)
        {
            Some(EndReason::DisconnectedTimeout)
        } else {
            None
        }
    }

    /// What this session's client is told at CONNECT: `base` with the
    /// session's own timeouts.
    pub fn tunnel_params<'a>(
        &self,
        base: &'a crate::proto::connect::TunnelParams,
    ) -> std::borrow::Cow<'a, crate::proto::connect::TunnelParams> {
        let own = self.own_timeouts;
        let pac = self.policy.lock().proxy_pac.clone();
        if own == OwnTimeouts::default() && pac.is_none() {
            return std::borrow::Cow::Borrowed(base);
        }
        let mut p = base.clone();
        if pac.is_some() {
            p.proxy_pac = pac;
        }
        if let Some(s) = own.session {
            p.session_timeout = p.session_timeout.min(s);
        }
        if let Some(i) = own.idle {
            p.idle_timeout_secs = match p.idle_timeout_secs {
                0 => i.as_secs(),
                n => n.min(i.as_secs()),
            };
        }
        std::borrow::Cow::Owned(p)
    }

    pub fn touch(&self) {
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether `pkt`, a packet from this session's client that passed
    /// [`crate::packet::ip::valid_ip_packet`], has one of the session's own
    /// addresses as its source. The BPF programs only know that a source
    /// belongs to *some* session, and would apply that session's policy: a
    /// client could send as another user (audit H2). So every packet from
    /// a client is checked here, where its session is known, before it
    /// reaches the tunnel device. An IPv4-mapped IPv6 source is never the
    /// session's own (its IPv6 address is from the pool), so the BPF map's
    /// mapped keys for IPv4 cannot be reached that way.
    ///
    /// A foreign source is counted in `spoofed_dropped`; the first is
    /// logged. IPv6 link-local and unspecified sources are dropped too but
    /// not counted: a client's OS sends router solicitations and MLD
    /// reports from them on its tunnel interface as soon as it comes up.
    pub fn owns_source(&self, pkt: &[u8]) -> bool {
        let src: IpAddr = match pkt.first().map(|b| b >> 4) {
            Some(4) => match pkt.get(12..16).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                Some(a) => a.into(),
                None => return false,
            },
            Some(6) => match pkt.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                Some(a) => a.into(),
                None => return false,
            },
            _ => return false,
        };
        if self.addresses().any(|a| a == src) {
            return true;
        }
        let local = match src {
            IpAddr::V6(a) => a.is_unspecified() || a.is_unicast_link_local(),
            IpAddr::V4(_) => false,
        };
        if !local && self.spoofed_dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                parent: &self.span,
                %src,
                "dropping packets from the client whose source is not its own VPN address"
            );
        }
        false
    }

    /// The span every log line about this session runs in: its id, user
    /// and VPN address, so one session's lines are found together.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// The session's tunnel addresses.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(IpAddr::V4(self.lease.v4)).chain(self.lease.v6.map(IpAddr::V6))
    }

    /// Queues a packet for the client in its TLS tunnel's queue. A full
    /// queue drops, as an interface queue would.
    pub fn deliver(&self, pkt: Vec<u8>) {
        let slot = self.tunnel.lock();
        if let Some(h) = &slot.handle {
            let _ = h.to_client.try_send(pkt);
        }
    }
}

/// A new session cookie: 256 random bits from the OS CSPRNG, hex-encoded
/// (no `=`, `;` or spaces, which openconnect would split on).
pub fn new_cookie() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Cookies are stored only as SHA-256 hashes; lookups hash the presented
/// cookie, so neither a memory dump nor lookup timing reveals valid ones.
pub fn cookie_hash(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// All sessions, indexed three ways.
#[derive(Default)]
pub struct SessionTable {
    inner: RwLock<Indexes>,
    next_id: AtomicU64,
    /// Told of every insert and removal (`session.persist` saves then).
    pub changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Indexes {
    by_id: HashMap<u64, std::sync::Arc<Session>>,
    by_cookie: HashMap<[u8; 32], u64>,
    by_addr: HashMap<IpAddr, std::sync::Arc<Session>>,
}

impl SessionTable {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn insert(&self, s: std::sync::Arc<Session>, cookie: &str) {
        self.insert_hashed(s, cookie_hash(cookie));
    }

    /// Inserts a session known by its cookie's hash (a restored one).
    pub fn insert_hashed(&self, s: std::sync::Arc<Session>, cookie_hash: [u8; 32]) {
        let mut i = self.inner.write();
        i.by_cookie.insert(cookie_hash, s.id);
        for a in s.addresses() {
            i.by_addr.insert(a, s.clone());
        }
        i.by_id.insert(s.id, s);
        drop(i);
        self.changed.notify_one();
    }

    /// Every session with its cookie's hash.
    pub fn with_cookie_hashes(&self) -> Vec<(std::sync::Arc<Session>, [u8; 32])> {
        let i = self.inner.read();
        i.by_cookie
            .iter()
            .filter_map(|(h, id)| i.by_id.get(id).map(|s| (s.clone(), *h)))
            .collect()
    }

    /// Ids from now on are above `id` (after restoring sessions).
    pub fn ids_above(&self, id: u64) {
        self.next_id.fetch_max(id, Ordering::Relaxed);
    }

    /// Removes a session from every index; `None` if it was already gone
    /// (so exactly one caller ends each session).
    pub fn remove(&self, id: u64) -> Option<std::sync::Arc<Session>> {
        let mut i = self.inner.write();
        let s = i.by_id.remove(&id)?;
        i.by_cookie.retain(|_, v| *v != id);
        for a in s.addresses() {
            i.by_addr.remove(&a);
        }
        drop(i);
        self.changed.notify_one();
        Some(s)
    }

    pub fn by_cookie(&self, cookie: &str) -> Option<std::sync::Arc<Session>> {
        let i = self.inner.read();
        let id = i.by_cookie.get(&cookie_hash(cookie))?;
        i.by_id.get(id).cloned()
    }

    pub fn by_addr(&self, a: &IpAddr) -> Option<std::sync::Arc<Session>> {
        self.inner.read().by_addr.get(a).cloned()
    }

    /// Sessions of `user`.
    pub fn count_of(&self, user: &str) -> usize {
        self.inner
            .read()
            .by_id
            .values()
            .filter(|s| s.user == user)
            .count()
    }

    pub fn len(&self) -> usize {
        self.inner.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of all sessions, oldest first.
    pub fn all(&self) -> Vec<std::sync::Arc<Session>> {
        let mut v: Vec<_> = self.inner.read().by_id.values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::Ipv4Addr, sync::Arc};

    fn session(id: u64, last: u8) -> Arc<Session> {
        Arc::new(Session {
            id,
            user: "alice".into(),
            group: "default".into(),
            policy: Mutex::new(PolicyBinding::default()),
            rate_up_bps: AtomicU64::new(0),
            rate_down_bps: AtomicU64::new(0),
            lease: Lease {
                v4: Ipv4Addr::new(198, 19, 0, last),
                v6: None,
            },
            login_from: "198.18.1.2".parse().unwrap(),
            mac: [2, 0, 0, 0, 0, 1],
            created: SystemTime::now(),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            tunnel: Mutex::new(TunnelSlot::default()),
            spoofed_dropped: AtomicU64::new(0),
            own_timeouts: OwnTimeouts::default(),
            class: Vec::new(),
            groups: Vec::new(),
            auth_source: crate::auth::AuthSource::Local,
            span: tracing::Span::none(),
        })
    }

    #[test]
    fn expiry_reasons() {
        let t = Timeouts {
            session: Duration::from_secs(8 * 3600),
            idle: Duration::from_secs(600),
            disconnected: Duration::from_secs(300),
        };
        let s = session(1, 2);
        let start = s.started;
        // Fresh session without a tunnel yet: fine until the disconnected timeout.
        s.tunnel.lock().down_since = Some(start);
        assert_eq!(s.expiry(&t, start + Duration::from_secs(299)), None);
        assert_eq!(
            s.expiry(&t, start + Duration::from_secs(300)),
            Some(EndReason::DisconnectedTimeout)
        );
        // Tunnel up, traffic 100 s in: idle counts from the last packet.
        s.tunnel.lock().down_since = None;
        s.last_activity_ms.store(100_000, Ordering::Relaxed);
        assert_eq!(s.expiry(&t, start + Duration::from_secs(699)), None);
        assert_eq!(
            s.expiry(&t, start + Duration::from_secs(700)),
            Some(EndReason::IdleTimeout)
        );
        // The session timeout wins over everything.
        s.last_activity_ms.store(8 * 3600 * 1000, Ordering::Relaxed);
        assert_eq!(
            s.expiry(&t, start + Duration::from_secs(8 * 3600)),
            Some(EndReason::SessionTimeout)
        );
        // idle = 0 disables the idle timeout.
        let never = Timeouts {
            idle: Duration::ZERO,
            ..t
        };
        s.last_activity_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            s.expiry(&never, start + Duration::from_secs(7 * 3600)),
            None
        );
    }

    #[test]
    fn only_the_sessions_own_sources_pass() {
        let mut s = session(1, 2);
        Arc::get_mut(&mut s).unwrap().lease.v6 = Some("fd00:1::2".parse().unwrap());
        let v4 = |src: [u8; 4]| {
            let mut p = [0u8; 20];
            p[0] = 0x45;
            p[12..16].copy_from_slice(&src);
            p
        };
        let v6 = |src: &str| {
            let mut p = [0u8; 40];
            p[0] = 0x60;
            p[8..24].copy_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
            p
        };
        assert!(s.owns_source(&v4([198, 19, 0, 2])));
        assert!(s.owns_source(&v6("fd00:1::2")));
        assert!(!s.owns_source(&v4([198, 19, 0, 3])), "another session's");
        assert!(!s.owns_source(&v6("fd00:1::3")));
        assert!(!s.owns_source(&v6("::ffff:198.19.0.2")), "IPv4-mapped");
        assert_eq!(s.spoofed_dropped.load(Ordering::Relaxed), 3);
        // Dropped, not counted: what a client's OS sends on its tunnel
        // interface before it has an address.
        assert!(!s.owns_source(&v6("fe80::1")));
        assert!(!s.owns_source(&v6("::")));
        assert!(!s.owns_source(&v4([198, 19, 0, 2])[..12]), "truncated");
        assert_eq!(s.spoofed_dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn cookie_is_long_random_hex() {
        let a = new_cookie();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_cookie());
    }

    #[test]
    fn indexes_follow_insert_and_remove() {
        let t = SessionTable::default();
        t.insert(session(1, 2), "c1");
        t.insert(session(2, 3), "c2");
        assert_eq!(t.by_cookie("c2").unwrap().id, 2);
        assert!(t.by_cookie("c3").is_none());
        assert_eq!(t.by_addr(&"198.19.0.2".parse().unwrap()).unwrap().id, 1);
        assert!(t.remove(1).is_some());
        assert!(t.remove(1).is_none(), "a session ends once");
        assert!(t.by_cookie("c1").is_none());
        assert!(t.by_addr(&"198.19.0.2".parse().unwrap()).is_none());
        assert_eq!(t.len(), 1);
    }
}
