//! Ban points: sources that misbehave lose the right to open connections.
//!
//! Each offence a source commits scores points ([`Offence`], weights in
//! `[ban]`); a source whose score reaches `ban.max_score` is banned for
//! `ban.ban_secs`. A ban stops new connections only, as ocserv's does: the
//! XDP guard drops the source's TCP SYNs to the TLS port and its DTLS
//! ClientHellos before any socket work (`datapath/bpf.rs`, map `banned`),
//! and the listener closes what gets past it (an uplink without the guard,
//! IPv4 with options) at accept. Tunnels already up from that address stay
//! up: one user's typos behind a shared NAT address do not cut off the
//! others' sessions; `vpnctl disconnect` does that on purpose.
//!
//! Only offences from a source proven by a TCP handshake score: a wrong
//! password or unknown user, a login attempt while locked out, a malformed
//! HTTP request, a failed or abandoned TLS handshake, a CONNECT with an
//! unknown cookie, a CSTP frame that does not parse. Nothing on UDP scores: a datagram's source address is
//! whatever its sender wrote, and scoring it would let anyone ban anyone.
//! DTLS floods meet the guard's per-source ClientHello buckets instead.
//!
//! Sources are counted as elsewhere before authentication: an IPv4
//! address, an IPv6 /64. A score is forgotten `ban.reset_secs` after its
//! last point. Addresses in `ban.exempt` never score. Admins add and lift
//! bans of any prefix with `vpnctl ban`.
//!
//! [`BanBook`] is the pure state (the caller passes `now`, so its rules
//! are unit-tested without sleeping); [`Bans`] puts it behind a lock,
//! carries each change to the data path and the event log, and ends bans
//! whose time is up.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use parking_lot::Mutex;

use crate::{
    config::BanConfig,
    events::{Event, EventLog},
    packet::ip::source_key,
};

/// What a source did to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Offence {
    /// A wrong password or an unknown user name.
    WrongPassword,
    /// A login attempt while the source or user was locked out.
    LockedOut,
    /// An HTTP request the gateway could not read (400, 413, 414, 431,
    /// ...), not a slow one.
    MalformedRequest,
    /// A TLS handshake that failed or did not finish in time.
    FailedHandshake,
    /// `CONNECT` with a cookie of no session.
    UnknownCookie,
    /// A CSTP frame that does not parse, on a TLS tunnel (the tunnel
    /// ends).
    BadRecord,
}

impl Offence {
    pub const ALL: [Offence; 6] = [
        Offence::WrongPassword,
        Offence::LockedOut,
        Offence::MalformedRequest,
        Offence::FailedHandshake,
        Offence::UnknownCookie,
        Offence::BadRecord,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Offence::WrongPassword => "wrong-password",
            Offence::LockedOut => "locked-out",
            Offence::MalformedRequest => "malformed-request",
            Offence::FailedHandshake => "failed-handshake",
            Offence::UnknownCookie => "unknown-cookie",
            Offence::BadRecord => "bad-record",
        }
    }

    fn points(self, c: &BanConfig) -> u32 {
        match self {
            Offence::WrongPassword => c.wrong_password_points,
            Offence::LockedOut => c.locked_out_points,
            Offence::MalformedRequest => c.malformed_request_points,
            Offence::FailedHandshake => c.failed_handshake_points,
            Offence::UnknownCookie => c.unknown_cookie_points,
            Offence::BadRecord => c.bad_record_points,
        }
    }
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub net: IpNet,
    /// When it ends; None = when an admin lifts it.
    pub until: Option<Instant>,
    pub since: SystemTime,
    /// What earned it: the offences with their counts, or "vpnctl".
    pub reason: String,
}

/// A source's score.
#[derive(Debug, Default)]
struct Score {
    points: u32,
    last: Option<Instant>,
    /// Offences by kind, for the ban's reason.
    counts: HashMap<Offence, u32>,
}

/// Sources scored at once; beyond it, new sources score only once old
/// scores have been forgotten (an attacker with more addresses than this
/// is not stopped by per-source bans anyway).
const MAX_SCORES: usize = 65_536;

/// The scores and bans (pure: time is passed in).
pub struct BanBook {
    rules: BanConfig,
    scores: HashMap<IpAddr, Score>,
    bans: HashMap<IpNet, Ban>,
    /// The prefix lengths bans use, per family (v4, v6), to look an
    /// address up without scanning every ban.
    lens: (BTreeSet<u8>, BTreeSet<u8>),
}

impl BanBook {
    pub fn new(rules: BanConfig) -> Self {
        BanBook {
            rules,
            scores: HashMap::new(),
            bans: HashMap::new(),
            lens: Default::default(),
        }
    }

    pub fn set_rules(&mut self, rules: BanConfig) {
        self.rules = rules;
    }

    /// Scores `offence` for `ip`; returns the ban it earned, if it did.
    pub fn offence(&mut self, ip: IpAddr, offence: Offence, now: Instant) -> Option<Ban> {
        let r = &self.rules;
        let points = offence.points(r);
        if r.max_score == 0 || points == 0 || r.exempt.iter().any(|n| n.contains(&ip)) {
            return None;
        }
        if self.banned(ip, now).is_some() {
            return None;
        }
        let source = source_key(ip);
        let reset = Duration::from_secs(r.reset_secs);
        if self.scores.len() >= MAX_SCORES && !self.scores.contains_key(&source) {
            self.scores
                .retain(|_, s| s.last.is_some_and(|l| now.duration_since(l) < reset));
            if self.scores.len() >= MAX_SCORES {
                return None;
            }
        }
        let s = self.scores.entry(source).or_default();
        if s.last.is_some_and(|l| now.duration_since(l) >= reset) {
            *s = Score::default();
        }
        s.points = s.points.saturating_add(points);
        s.last = Some(now);
        *s.counts.entry(offence).or_default() += 1;
        // Bounded as the guard's map is; the score stays for later.
        if s.points < r.max_score || self.bans.len() >= vpn_common::MAX_BANS as usize {
            return None;
        }
        let mut counts: Vec<(Offence, u32)> = s.counts.iter().map(|(o, n)| (*o, *n)).collect();
        counts.sort_by_key(|(o, _)| Offence::ALL.iter().position(|x| x == o));
        let reason = format!(
            "score {} of {}: {}",
            s.points,
            r.max_score,
            counts
                .iter()
                .map(|(o, n)| format!("{} x{n}", o.name()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.scores.remove(&source);
        let net = IpNet::new(source, if source.is_ipv4() { 32 } else { 64 })
            .expect("a valid prefix length");
        let time = Duration::from_secs(self.rules.ban_secs);
        Some(self.add(net, Some(time), reason, now))
    }

    /// Bans `net` for `time` (None: until lifted), replacing a ban of the
    /// same prefix.
    pub fn add(&mut self, net: IpNet, time: Option<Duration>, reason: String, now: Instant) -> Ban {
        let net = net.trunc();
        let ban = Ban {
            net,
            until: time.map(|t| now + t),
            since: SystemTime::now(),
            reason,
        };
        match net {
            IpNet::V4(n) => self.lens.0.insert(n.prefix_len()),
            IpNet::V6(n) => self.lens.1.insert(n.prefix_len()),
        };
        self.bans.insert(net, ban.clone());
        ban
    }

    /// Lifts the ban of exactly `net`; returns it.
    pub fn remove(&mut self, net: IpNet) -> Option<Ban> {
        self.bans.remove(&net.trunc())
    }

    /// The ban that covers `ip` now, if any.
    pub fn banned(&self, ip: IpAddr, now: Instant) -> Option<&Ban> {
        let ip = ip.to_canonical();
        let lens = if ip.is_ipv4() {
            &self.lens.0
        } else {
            &self.lens.1
        };
        lens.iter().rev().find_map(|&len| {
            let net = IpNet::new(ip, len).ok()?.trunc();
            self.bans
                .get(&net)
                .filter(|b| b.until.is_none_or(|u| now < u))
        })
    }

    /// Removes and returns the bans whose time is up.
    pub fn expire(&mut self, now: Instant) -> Vec<Ban> {
        let done: Vec<IpNet> = self
            .bans
            .values()
            .filter(|b| b.until.is_some_and(|u| now >= u))
            .map(|b| b.net)
            .collect();
        done.into_iter()
            .filter_map(|n| self.bans.remove(&n))
            .collect()
    }

    /// Every ban, longest-standing first.
    pub fn list(&self) -> Vec<Ban> {
        let mut v: Vec<Ban> = self.bans.values().cloned().collect();
        v.sort_by_key(|b| b.since);
        v
    }

    /// Sources with a score now.
    pub fn scored(&self) -> usize {
        self.scores.len()
    }
}

/// What carries a ban to the data path: `(net, Some(time left))` bans,
/// `(net, None)` lifts. Errors are logged by the caller.
pub type Enforce = Box<dyn Fn(IpNet, Option<Option<Duration>>) -> anyhow::Result<()> + Send + Sync>;

/// The scores and bans of the running daemon.
pub struct Bans {
    book: Mutex<BanBook>,
    enforce: Enforce,
    events: Arc<EventLog>,
    /// Offences scored, per [`Offence`] (in `Offence::ALL` order).
    offences: [AtomicU64; 6],
    /// Bans made by points, and connections closed at accept because
    /// their source was banned.
    pub banned_total: AtomicU64,
    pub refused_at_accept: AtomicU64,
}

impl Bans {
    pub fn new(rules: BanConfig, enforce: Enforce, events: Arc<EventLog>) -> Arc<Self> {
        Arc::new(Bans {
            book: Mutex::new(BanBook::new(rules)),
            enforce,
            events,
            offences: Default::default(),
            banned_total: AtomicU64::new(0),
            refused_at_accept: AtomicU64::new(0),
        })
    }

    /// A reload's new `[ban]`: scores and bans already made stay.
    pub fn set_rules(&self, rules: BanConfig) {
        self.book.lock().set_rules(rules);
    }

    /// Scores `offence` for `ip`, banning it if that reaches the limit.
    pub fn offence(&self, ip: IpAddr, offence: Offence) {
        if let Some(i) = Offence::ALL.iter().position(|o| *o == offence) {
            self.offences[i].fetch_add(1, Ordering::Relaxed);
        }
        let ban = self.book.lock().offence(ip, offence, Instant::now());
        if let Some(ban) = ban {
            self.banned_total.fetch_add(1, Ordering::Relaxed);
            self.install(&ban);
        }
    }

    /// Whether `ip` is banned now (the listener asks at accept).
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let banned = self.book.lock().banned(ip, Instant::now()).is_some();
        if banned {
            self.refused_at_accept.fetch_add(1, Ordering::Relaxed);
        }
        banned
    }

    /// An admin's ban (`vpnctl ban add`).
    pub fn add(&self, net: IpNet, time: Option<Duration>) -> Ban {
        let ban = self
            .book
            .lock()
            .add(net, time, "vpnctl".into(), Instant::now());
        self.install(&ban);
        ban
    }

    /// An admin lifts a ban (`vpnctl ban remove`); None if there was none.
    pub fn remove(&self, net: IpNet) -> Option<Ban> {
        let ban = self.book.lock().remove(net)?;
        self.lift(&ban, "vpnctl");
        Some(ban)
    }

    pub fn list(&self) -> Vec<Ban> {
        self.book.lock().list()
    }

    /// Counters for `vpnctl stats`.
    pub fn stats(&self) -> crate::api::BanStats {
        let book = self.book.lock();
        crate::api::BanStats {
            active: book.bans.len(),
            scored_sources: book.scored(),
            banned_total: self.banned_total.load(Ordering::Relaxed),
            refused_at_accept: self.refused_at_accept.load(Ordering::Relaxed),
            offences: Offence::ALL
                .iter()
                .zip(&self.offences)
                .map(|(o, n)| (o.name().to_owned(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Ends the bans whose time is up, every `every`, for the daemon's
    /// life. The guard stops dropping at the end time by itself; this
    /// removes the entries and says so.
    pub async fn expire_every(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let done = self.book.lock().expire(Instant::now());
            for ban in done {
                self.lift(&ban, "expired");
            }
        }
    }

    fn install(&self, ban: &Ban) {
        let left = ban
            .until
            .map(|u| u.saturating_duration_since(Instant::now()));
        if let Err(e) = (self.enforce)(ban.net, Some(left)) {
            tracing::warn!(
                "ban of {} not in the XDP guard (the listener still refuses it): {e:#}",
                ban.net
            );
        }
        self.events.emit(Event::SourceBanned {
            source: ban.net.to_string(),
            reason: ban.reason.clone(),
            secs: left.map(|l| l.as_millis().div_ceil(1000) as u64),
        });
    }

    fn lift(&self, ban: &Ban, why: &str) {
        if let Err(e) = (self.enforce)(ban.net, None) {
            tracing::warn!("lifting the ban of {} in the XDP guard: {e:#}", ban.net);
        }
        self.events.emit(Event::BanLifted {
            source: ban.net.to_string(),
            reason: why.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> BanConfig {
        BanConfig {
            max_score: 100,
            reset_secs: 60,
            ban_secs: 600,
            wrong_password_points: 10,
            malformed_request_points: 50,
            exempt: vec!["198.18.9.0/24".parse().unwrap()],
            ..BanConfig::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_banned_when_its_score_reaches_the_limit() {
        let mut b = BanBook::new(rules());
        let t = Instant::now();
        let bad = ip("198.18.1.2");
        for i in 0..9 {
            assert_eq!(
                b.offence(bad, Offence::WrongPassword, t),
                None,
                "offence {i}"
            );
        }
        assert!(b.banned(bad, t).is_none());
        let ban = b.offence(bad, Offence::WrongPassword, t).expect("banned");
        assert_eq!(ban.net, "198.18.1.2/32".parse::<IpNet>().unwrap());
        assert_eq!(ban.until, Some(t + Duration::from_secs(600)));
        assert_eq!(ban.reason, "score 100 of 100: wrong-password x10");
        assert!(b.banned(bad, t).is_some());
        assert!(b.banned(ip("198.18.1.3"), t).is_none(), "a neighbour");
        // Kinds add up.
        let other = ip("198.18.1.4");
        assert_eq!(b.offence(other, Offence::MalformedRequest, t), None);
        let ban = b.offence(other, Offence::MalformedRequest, t).unwrap();
        assert_eq!(ban.reason, "score 100 of 100: malformed-request x2");
        // The ban ends on time.
        let later = t + Duration::from_secs(600);
        assert!(b.banned(bad, later).is_none());
        let ended: Vec<IpNet> = b.expire(later).into_iter().map(|b| b.net).collect();
        assert_eq!(ended.len(), 2);
        assert!(b.list().is_empty());
    }

    #[test]
    fn a_quiet_source_is_forgiven_and_exempt_ones_never_score() {
        let mut b = BanBook::new(rules());
        let t = Instant::now();
        let a = ip("198.18.1.2");
        for _ in 0..9 {
            b.offence(a, Offence::WrongPassword, t);
        }
        // A minute without offences: the score starts over.
        let t2 = t + Duration::from_secs(60);
        for _ in 0..9 {
            assert_eq!(b.offence(a, Offence::WrongPassword, t2), None);
        }
        for _ in 0..100 {
            assert_eq!(
                b.offence(ip("198.18.9.7"), Offence::MalformedRequest, t),
                None
            );
        }
        // A weight of 0 turns an offence off; a limit of 0 all of them.
        assert_eq!(b.offence(a, Offence::UnknownCookie, t2), None);
        b.set_rules(BanConfig {
            max_score: 0,
            ..rules()
        });
        assert_eq!(b.offence(a, Offence::MalformedRequest, t2), None);
        assert_eq!(b.offence(a, Offence::MalformedRequest, t2), None);
    }

    /// Bans by points are bounded as the guard's map is: past
    /// `MAX_BANS`, a source that reaches the limit keeps its score and
    /// is not banned (the listener's lockouts still hold it back).
    #[test]
    fn bans_by_points_stop_at_the_maps_size() {
        let mut b = BanBook::new(BanConfig {
            max_score: 5,
            wrong_password_points: 5,
            ..rules()
        });
        let t = Instant::now();
        let max = vpn_common::MAX_BANS as usize;
        for i in 0..max {
            // A /64 each: fd00:0:0:i::1.
            let ip = IpAddr::from(std::net::Ipv6Addr::from(
                0xfd00_u128 << 112 | (i as u128) << 64 | 1,
            ));
            assert!(b.offence(ip, Offence::WrongPassword, t).is_some(), "{i}");
        }
        let over = ip("fd00:1::1");
        assert_eq!(b.offence(over, Offence::WrongPassword, t), None);
        assert_eq!(b.list().len(), max);
        // Room again once bans end.
        b.expire(t + Duration::from_secs(600));
        assert!(
            b.offence(over, Offence::WrongPassword, t + Duration::from_secs(600))
                .is_some()
        );
    }

    #[test]
    fn ipv6_sources_are_their_64_and_admins_ban_any_prefix() {
        let mut b = BanBook::new(rules());
        let t = Instant::now();
        // Ten addresses of one /64 are one source.
        let ban = (1..=10)
            .find_map(|i| b.offence(ip(&format!("fd00:1:2:3::{i}")), Offence::WrongPassword, t))
            .expect("banned by the tenth");
        assert_eq!(ban.net, "fd00:1:2:3::/64".parse::<IpNet>().unwrap());
        assert!(b.banned(ip("fd00:1:2:3::99"), t).is_some());
        assert!(b.banned(ip("fd00:1:2:4::1"), t).is_none());
        // A prefix, for good; the longest prefix that covers wins.
        b.add("198.18.4.0/22".parse().unwrap(), None, "vpnctl".into(), t);
        b.add(
            "198.18.5.0/24".parse().unwrap(),
            Some(Duration::from_secs(5)),
            "vpnctl".into(),
            t,
        );
        let later = t + Duration::from_secs(3600);
        assert_eq!(
            b.banned(ip("198.18.5.9"), t).unwrap().net,
            "198.18.5.0/24".parse::<IpNet>().unwrap()
        );
        assert!(b.banned(ip("198.18.6.1"), later).is_some(), "no end");
        assert!(b.banned(ip("198.18.8.1"), t).is_none());
        // IPv4-mapped IPv6 peers (a dual-stack socket) are IPv4.
        assert!(b.banned(ip("::ffff:198.18.6.1"), t).is_some());
        assert!(b.remove("198.18.4.0/22".parse().unwrap()).is_some());
        assert!(b.banned(ip("198.18.6.1"), t).is_none());
        // A banned source does not score on.
        assert_eq!(
            b.offence(ip("fd00:1:2:3::1"), Offence::WrongPassword, t),
            None
        );
    }
}
