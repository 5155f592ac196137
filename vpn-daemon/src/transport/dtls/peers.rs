//! Who sends to the DTLS port: established channels and handshakes in
//! progress, by the client's address.
//!
//! An address can have an established channel and a handshake beside it:
//! a ClientHello never displaces a channel. A spoofed one from a client's
//! own address and port (the App-ID travels in clear, so anyone on the
//! path has it) used to replace the channel, and DTLS stayed dead until
//! the client gave up on it (audit M2). The new handshake's channel takes
//! the address over only once it is established and its handshake is the
//! one its offer allows.
//!
//! Handshakes in progress are bounded in total, per source (an IPv4
//! address or IPv6 /64) and per offer: each holds an OpenSSL object, a
//! queue and a timer until it completes or times out.
//!
//! Records from an address with no channel are a client whose NAT mapping
//! changed: the channels that may own them are those seen at the same IP
//! (a new port), or whose client's TLS connection comes from it
//! ([`Peers::candidates`]), an index lookup rather than a walk over every
//! channel, and the trials are budgeted per source ([`TrialBudget`]), so
//! junk from one address cannot starve another's rebinding (audit M1).
//!
//! No I/O here: the receive path routes datagrams with [`Peers::route`],
//! the handshake tasks report their progress.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use crate::packet::ip::source_key;

/// Handshakes in progress for one offer at most: a client runs one at a
/// time, and retransmits its ClientHello into the same one.
pub const MAX_HANDSHAKES_PER_OFFER: u32 = 4;

/// Limits on handshakes in progress (`[dtls]`).
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    pub total: usize,
    pub per_source: u32,
}

/// Why a ClientHello did not start a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRefused {
    Total,
    Source,
    Offer,
}

/// Where a datagram goes.
pub enum Route<L, T> {
    /// Application data of an established channel: its records.
    Channel(L),
    /// To a task that runs OpenSSL for this address (handshake, alerts).
    Task(T),
    /// A ClientHello that may start a handshake.
    NewHandshake,
    /// Application data from an address without a channel: a rebinding?
    Unknown,
    /// Nothing here wants it.
    Drop,
}

/// What a datagram looks like, from its first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ApplicationData,
    ClientHello,
    Other,
}

struct Channel<L, T> {
    link: L,
    id: u64,
    /// The channel task's queue (alerts, OpenSSL's retransmissions).
    task: T,
    /// Where its client's TLS connection comes from: it is indexed under
    /// that IP and its own address's.
    tls_ip: Option<IpAddr>,
}

impl<L, T> Channel<L, T> {
    /// The IPs a channel at `addr` is indexed under.
    fn ips(&self, addr: SocketAddr) -> impl Iterator<Item = IpAddr> + use<L, T> {
        let own = addr.ip();
        std::iter::once(own).chain(self.tls_ip.filter(|t| *t != own))
    }
}

struct Handshake<T> {
    id: u64,
    task: T,
    source: IpAddr,
    offer: [u8; 32],
}

struct Peer<L, T> {
    channel: Option<Channel<L, T>>,
    handshake: Option<Handshake<T>>,
}

/// The peers of the DTLS port. `L` is the channel's handle
/// (`Arc<Link>`), `T` a task's queue.
pub struct Peers<L, T> {
    by_addr: HashMap<SocketAddr, Peer<L, T>>,
    /// Channel addresses by the IPs they are indexed under.
    by_ip: HashMap<IpAddr, HashSet<SocketAddr>>,
    handshakes: usize,
    per_source: HashMap<IpAddr, u32>,
    per_offer: HashMap<[u8; 32], u32>,
    next_id: u64,
}

impl<L, T> Default for Peers<L, T> {
    fn default() -> Self {
        Peers {
            by_addr: HashMap::new(),
            by_ip: HashMap::new(),
            handshakes: 0,
            per_source: HashMap::new(),
            per_offer: HashMap::new(),
            next_id: 1,
        }
    }
}

impl<L: Clone, T: Clone> Peers<L, T> {
    /// Where a datagram of `kind` from `from` goes.
    pub fn route(&self, from: SocketAddr, kind: Kind) -> Route<L, T> {
        let Some(p) = self.by_addr.get(&from) else {
            return match kind {
                Kind::ApplicationData => Route::Unknown,
                Kind::ClientHello => Route::NewHandshake,
                Kind::Other => Route::Drop,
            };
        };
        match (kind, &p.channel, &p.handshake) {
            (Kind::ApplicationData, Some(c), _) => Route::Channel(c.link.clone()),
            // Retransmissions, and the rest of the handshake.
            (_, _, Some(h)) => Route::Task(h.task.clone()),
            (Kind::ClientHello, _, None) => Route::NewHandshake,
            (Kind::Other, Some(c), None) => Route::Task(c.task.clone()),
            (_, None, None) => Route::Drop,
        }
    }

    /// Starts a handshake from `from` for offer `offer`, within `limits`;
    /// returns its id.
    pub fn begin_handshake(
        &mut self,
        from: SocketAddr,
        offer: [u8; 32],
        task: T,
        limits: HandshakeLimits,
    ) -> Result<u64, HandshakeRefused> {
        let source = source_key(from.ip());
        if self.handshakes >= limits.total {
            return Err(HandshakeRefused::Total);
        }
        if self.per_source.get(&source).copied().unwrap_or(0) >= limits.per_source {
            return Err(HandshakeRefused::Source);
        }
        if self.per_offer.get(&offer).copied().unwrap_or(0) >= MAX_HANDSHAKES_PER_OFFER {
            return Err(HandshakeRefused::Offer);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.handshakes += 1;
        *self.per_source.entry(source).or_insert(0) += 1;
        *self.per_offer.entry(offer).or_insert(0) += 1;
        let p = self.by_addr.entry(from).or_insert(Peer {
            channel: None,
            handshake: None,
        });
        // `route` sends hellos from an address with a handshake to it, so
        // there is none here; count one that somehow was as ended.
        if let Some(old) = p.handshake.replace(Handshake {
            id,
            task,
            source,
            offer,
        }) {
            self.release(&old);
        }
        Ok(id)
    }

    fn release(&mut self, h: &Handshake<T>) {
        self.handshakes -= 1;
        dec(&mut self.per_source, h.source);
        dec(&mut self.per_offer, h.offer);
    }

    /// Handshake `id` from `from` failed or timed out.
    pub fn end_handshake(&mut self, from: SocketAddr, id: u64) {
        let Some(p) = self.by_addr.get_mut(&from) else {
            return;
        };
        if p.handshake.as_ref().is_none_or(|h| h.id != id) {
            return;
        }
        let h = p.handshake.take().expect("checked above");
        if p.channel.is_none() {
            self.by_addr.remove(&from);
        }
        self.release(&h);
    }

    /// Handshake `id` from `from` established channel `link` (`link_id`),
    /// whose client's TLS connection comes from `tls_ip`: it takes the
    /// address over. Returns the channel it replaced there, if any, for
    /// the caller to close. `None` and nothing changes if the handshake
    /// is no longer the address's.
    pub fn establish(
        &mut self,
        from: SocketAddr,
        id: u64,
        link: L,
        link_id: u64,
        task: T,
        tls_ip: Option<IpAddr>,
    ) -> Option<Option<L>> {
        let p = self.by_addr.get_mut(&from)?;
        if p.handshake.as_ref().is_none_or(|h| h.id != id) {
            return None;
        }
        let h = p.handshake.take().expect("checked above");
        let new = Channel {
            link,
            id: link_id,
            task,
            tls_ip,
        };
        let ips: Vec<IpAddr> = new.ips(from).collect();
        let old = p.channel.replace(new);
        self.release(&h);
        if let Some(old) = &old {
            self.unindex(from, old.ips(from));
        }
        self.index(from, ips);
        Some(old.map(|c| c.link))
    }

    fn index(&mut self, addr: SocketAddr, ips: impl IntoIterator<Item = IpAddr>) {
        for ip in ips {
            self.by_ip.entry(ip).or_default().insert(addr);
        }
    }

    fn unindex(&mut self, addr: SocketAddr, ips: impl IntoIterator<Item = IpAddr>) {
        for ip in ips {
            if let Some(set) = self.by_ip.get_mut(&ip) {
                set.remove(&addr);
                if set.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    /// The channel `link_id` ended: it is forgotten wherever it is.
    pub fn close_channel(&mut self, link_id: u64, last_addr: SocketAddr) {
        let Some(p) = self.by_addr.get_mut(&last_addr) else {
            return;
        };
        if p.channel.as_ref().is_none_or(|c| c.id != link_id) {
            return;
        }
        let c = p.channel.take().expect("checked above");
        if p.handshake.is_none() {
            self.by_addr.remove(&last_addr);
        }
        self.unindex(last_addr, c.ips(last_addr));
    }

    /// The channels that may own a record from `ip`: those whose records
    /// came from it, or whose client's TLS connection does.
    pub fn candidates(&self, ip: IpAddr) -> Vec<(SocketAddr, L)> {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|a| {
                let c = self.by_addr.get(a)?.channel.as_ref()?;
                Some((*a, c.link.clone()))
            })
            .collect()
    }

    /// The channel at `old` authenticated a record from `new`: it moves
    /// there (a handshake at `old` stays). `false` if it was not at `old`
    /// any more, or `new` has a channel of its own.
    pub fn move_channel(&mut self, old: SocketAddr, new: SocketAddr) -> bool {
        if self.by_addr.get(&new).is_some_and(|p| p.channel.is_some()) {
            return false;
        }
        let Some(p) = self.by_addr.get_mut(&old) else {
            return false;
        };
        let Some(c) = p.channel.take() else {
            return false;
        };
        if p.handshake.is_none() {
            self.by_addr.remove(&old);
        }
        self.unindex(old, c.ips(old));
        self.index(new, c.ips(new));
        self.by_addr
            .entry(new)
            .or_insert(Peer {
                channel: None,
                handshake: None,
            })
            .channel = Some(c);
        true
    }

    /// Handshakes in progress.
    pub fn handshakes(&self) -> usize {
        self.handshakes
    }
}

fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: K) {
    if let Some(n) = m.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            m.remove(&k);
        }
    }
}

/// Trial decryptions for records from unknown addresses, per source: a
/// flood of junk from one address spends only its own budget.
pub struct TrialBudget {
    per_sec: u32,
    sources: HashMap<IpAddr, (Instant, u32)>,
}

/// Sources whose budget is tracked at most; when full, spent ones go.
const MAX_BUDGETS: usize = 16_384;

impl TrialBudget {
    pub fn new(per_sec: u32) -> Self {
        TrialBudget {
            per_sec,
            sources: HashMap::new(),
        }
    }

    /// Takes one trial for `ip`'s source at `now`; `false` when its budget
    /// for this second is spent.
    pub fn take(&mut self, ip: IpAddr, now: Instant) -> bool {
        let second = Duration::from_secs(1);
        if self.sources.len() >= MAX_BUDGETS {
            self.sources
                .retain(|_, (t, _)| now.saturating_duration_since(*t) < second);
            if self.sources.len() >= MAX_BUDGETS {
                // Every tracked source trying this second: a spoofed
                // flood; new sources wait for the next second.
                return false;
            }
        }
        let b = self
            .sources
            .entry(source_key(ip))
            .or_insert((now, self.per_sec));
        if now.saturating_duration_since(b.0) >= second {
            *b = (now, self.per_sec);
        }
        if b.1 == 0 {
            return false;
        }
        b.1 -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type P = Peers<&'static str, u8>;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const LIMITS: HandshakeLimits = HandshakeLimits {
        total: 5,
        per_source: 2,
    };

    #[test]
    fn a_hello_never_displaces_an_established_channel() {
        let mut p = P::default();
        let c = a("198.18.1.2:5000");
        let h = p.begin_handshake(c, [1; 32], 1, LIMITS).unwrap();
        assert!(matches!(p.route(c, Kind::Other), Route::Task(1)));
        assert_eq!(p.establish(c, h, "first", 10, 2, None), Some(None));
        assert_eq!(p.handshakes(), 0);
        // A hello from the same address: a handshake beside the channel.
        assert!(matches!(p.route(c, Kind::ClientHello), Route::NewHandshake));
        let h2 = p.begin_handshake(c, [1; 32], 3, LIMITS).unwrap();
        assert!(matches!(
            p.route(c, Kind::ApplicationData),
            Route::Channel("first")
        ));
        assert!(matches!(p.route(c, Kind::Other), Route::Task(3)));
        // It fails: the channel is untouched.
        p.end_handshake(c, h2);
        assert!(matches!(p.route(c, Kind::Other), Route::Task(2)));
        assert!(matches!(
            p.route(c, Kind::ApplicationData),
            Route::Channel("first")
        ));
        // One that completes takes the address over.
        let h3 = p.begin_handshake(c, [1; 32], 4, LIMITS).unwrap();
        assert_eq!(
            p.establish(c, h3, "second", 11, 5, None),
            Some(Some("first"))
        );
        assert!(matches!(
            p.route(c, Kind::ApplicationData),
            Route::Channel("second")
        ));
        // The old channel's end forgets nothing of the new one.
        p.close_channel(10, c);
        assert!(matches!(
            p.route(c, Kind::ApplicationData),
            Route::Channel("second")
        ));
        p.close_channel(11, c);
        assert!(matches!(p.route(c, Kind::ApplicationData), Route::Unknown));
        assert!(p.by_addr.is_empty() && p.by_ip.is_empty());
    }

    #[test]
    fn handshakes_are_bounded_in_total_per_source_and_per_offer() {
        let mut p = P::default();
        let src = |i: u16| a(&format!("198.18.1.2:{}", 1000 + i));
        assert!(p.begin_handshake(src(0), [1; 32], 0, LIMITS).is_ok());
        let h = p.begin_handshake(src(1), [2; 32], 0, LIMITS).unwrap();
        assert_eq!(
            p.begin_handshake(src(2), [3; 32], 0, LIMITS),
            Err(HandshakeRefused::Source)
        );
        // An IPv6 /64 is one source.
        let v6 = |i: u16| a(&format!("[fd00:1::{i}]:5000"));
        assert!(p.begin_handshake(v6(1), [4; 32], 0, LIMITS).is_ok());
        assert!(p.begin_handshake(v6(2), [5; 32], 0, LIMITS).is_ok());
        assert_eq!(
            p.begin_handshake(v6(3), [6; 32], 0, LIMITS),
            Err(HandshakeRefused::Source)
        );
        assert!(
            p.begin_handshake(a("198.18.3.2:1"), [7; 32], 0, LIMITS)
                .is_ok()
        );
        assert_eq!(
            p.begin_handshake(a("198.18.3.3:1"), [8; 32], 0, LIMITS),
            Err(HandshakeRefused::Total)
        );
        p.end_handshake(src(1), h);
        assert!(p.begin_handshake(src(2), [3; 32], 0, LIMITS).is_ok());
        // Per offer, from many sources.
        let mut p = P::default();
        let wide = HandshakeLimits {
            total: 100,
            per_source: 100,
        };
        for i in 0..MAX_HANDSHAKES_PER_OFFER {
            let from = a(&format!("198.18.3.{}:1", i + 1));
            assert!(p.begin_handshake(from, [9; 32], 0, wide).is_ok());
        }
        assert_eq!(
            p.begin_handshake(a("198.18.3.99:1"), [9; 32], 0, wide),
            Err(HandshakeRefused::Offer)
        );
    }

    #[test]
    fn rebinding_candidates_come_from_the_same_ip_or_the_tls_clients() {
        let mut p = P::default();
        let (c, tls) = (a("198.18.1.2:5000"), "198.18.9.9".parse().unwrap());
        let h = p.begin_handshake(c, [1; 32], 0, LIMITS).unwrap();
        p.establish(c, h, "alice", 1, 0, Some(tls));
        let names = |v: Vec<(SocketAddr, &'static str)>| -> Vec<&str> {
            v.into_iter().map(|(_, l)| l).collect()
        };
        assert_eq!(
            names(p.candidates("198.18.1.2".parse().unwrap())),
            ["alice"]
        );
        assert_eq!(names(p.candidates(tls)), ["alice"]);
        assert!(p.candidates("198.18.3.2".parse().unwrap()).is_empty());
        // A new port.
        let moved = a("198.18.1.2:40000");
        assert!(p.move_channel(c, moved));
        assert!(matches!(
            p.route(moved, Kind::ApplicationData),
            Route::Channel("alice")
        ));
        assert!(matches!(p.route(c, Kind::ApplicationData), Route::Unknown));
        assert_eq!(p.candidates("198.18.1.2".parse().unwrap())[0].0, moved);
        // To its TLS client's address: indexed there from now on.
        let roamed = a("198.18.9.9:7000");
        assert!(p.move_channel(moved, roamed));
        assert!(p.candidates("198.18.1.2".parse().unwrap()).is_empty());
        assert_eq!(p.candidates(tls)[0].0, roamed);
        p.close_channel(1, roamed);
        assert!(p.by_ip.is_empty());
    }

    #[test]
    fn trial_budgets_are_per_source() {
        let now = Instant::now();
        let mut b = TrialBudget::new(3);
        let (junk, client) = ("198.18.3.2".parse().unwrap(), "198.18.1.2".parse().unwrap());
        for _ in 0..3 {
            assert!(b.take(junk, now));
        }
        assert!(!b.take(junk, now));
        assert!(b.take(client, now), "another source has its own budget");
        assert!(b.take(junk, now + Duration::from_secs(1)), "refilled");
    }
}
