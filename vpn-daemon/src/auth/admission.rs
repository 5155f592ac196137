//! Admission before authentication: what a stranger on port 443 may use.
//!
//! Everything here bounds what someone without credentials can make the
//! gateway hold or do (audit H3), so that one address cannot lock
//! everyone else out or wear the machine down:
//!
//! - [`Connections`]: connections that have not become a tunnel, in total
//!   and per source.
//! - [`LoginGuard`]: logins in progress (in total and per source), and
//!   failed logins counted per source and per user over a window. A source
//!   past its limit is locked out for the rest of the window. A user past
//!   theirs is locked out only from addresses they have not logged in from
//!   before, so a stranger's guesses cannot lock the user out of their
//!   own devices (Azure AD's "smart lockout" works this way; ocserv's
//!   ban points are per source only).
//! - [`Verifier`]: password checks (argon2, 19 MiB and tens of
//!   milliseconds each) run at most one per core at a time, with a bounded
//!   queue; beyond it the answer is 503 at once.
//!
//! Sources are counted per address for IPv4 and per /64 for IPv6, since
//! one host usually holds a whole /64. [`LoginGuard`] is pure: the caller
//! passes `now`, so its rules are unit-tested without sleeping.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::packet::ip::source_key;

use crate::config::{AuthConfig, Limits};

/// Counters of what was refused, for `vpnctl stats`.
#[derive(Default)]
pub struct Counters {
    pub connections_refused_total: AtomicU64,
    pub connections_refused_source: AtomicU64,
    pub connections_closed_requests: AtomicU64,
    pub connections_closed_lifetime: AtomicU64,
    pub logins_refused_busy: AtomicU64,
    pub logins_refused_source_busy: AtomicU64,
    pub logins_refused_source_locked: AtomicU64,
    pub logins_refused_user_locked: AtomicU64,
    pub verifications_refused_busy: AtomicU64,
    /// Logins refused because the daemon's memory is above
    /// `limits.max_memory_mib`.
    pub logins_refused_memory: AtomicU64,
    /// Connections accepted at the descriptor limit only to be told so
    /// (`resources::SpareDescriptor`).
    pub connections_refused_descriptors: AtomicU64,
}

/// Connections that are not (yet) tunnels, in total and per source.
pub struct Connections {
    max_total: usize,
    max_per_source: u32,
    state: Mutex<(usize, HashMap<IpAddr, u32>)>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// `max_connections` are open.
    Total,
    /// The source has `max_connections_per_source` open.
    Source,
}

impl Connections {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Connections {
            max_total: limits.max_connections,
            max_per_source: limits.max_connections_per_source,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a slot for a new connection from `peer`; it is freed when the
    /// slot is dropped or the connection becomes a tunnel.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionSlot, ConnectionRefused> {
        let key = source_key(peer);
        let mut st = self.state.lock();
        if st.0 >= self.max_total {
            return Err(ConnectionRefused::Total);
        }
        let n = st.1.entry(key).or_insert(0);
        if *n >= self.max_per_source {
            return Err(ConnectionRefused::Source);
        }
        *n += 1;
        st.0 += 1;
        Ok(ConnectionSlot {
            owner: Some(self.clone()),
            key,
        })
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.state.lock().0
    }

    fn release(&self, key: IpAddr) {
        let mut st = self.state.lock();
        st.0 = st.0.saturating_sub(1);
        if let Some(n) = st.1.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&key);
            }
        }
    }
}

/// A connection's place in [`Connections`].
pub struct ConnectionSlot {
    owner: Option<Arc<Connections>>,
    key: IpAddr,
}

impl ConnectionSlot {
    /// The connection became a tunnel: it no longer counts. Tunnels are
    /// bounded by sessions, which only a login creates.
    pub fn into_tunnel(mut self) {
        if let Some(o) = self.owner.take() {
            o.release(self.key);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(o) = self.owner.take() {
            o.release(self.key);
        }
    }
}

/// A login in progress, between the first form and success.
#[derive(Debug, Clone)]
pub struct PendingLogin {
    pub group: String,
    /// Wrong passwords so far in this login.
    pub failures: u32,
    /// A second factor asked for and not answered yet.
    pub challenge: Option<Challenge>,
    /// The source that started it (counted against its limit).
    key: IpAddr,
    started: Instant,
}

/// A second factor a login waits for (RADIUS Access-Challenge): the next
/// reply answers it for `user`, with `state` sent back to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub user: String,
    pub prompt: String,
    /// Sent back to the server with the answer (empty: none).
    pub state: Vec<u8>,
    /// Set when this asks for the group's second factor: what the first
    /// granted.
    pub first: Option<crate::auth::Grant>,
}

/// Why a login is refused before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefused {
    /// `max_pending_logins` are in progress.
    Busy,
    /// The source has `max_pending_logins_per_source` in progress.
    SourceBusy,
    /// The source failed too often; locked until the window ends.
    SourceLocked { remaining: Duration },
    /// The user failed too often, and this address is not one they logged
    /// in from before.
    UserLocked { remaining: Duration },
}

impl LoginRefused {
    /// What the client is told.
    pub fn message(&self) -> String {
        let mins = |d: &Duration| d.as_secs().div_ceil(60).max(1);
        match self {
            LoginRefused::Busy => "too many logins in progress; try again shortly".into(),
            LoginRefused::SourceBusy => {
                "too many logins in progress from your address; finish or cancel them first".into()
            }
            LoginRefused::SourceLocked { remaining } => format!(
                "too many failed logins from your address; try again in {} minute(s)",
                mins(remaining)
            ),
            LoginRefused::UserLocked { remaining } => format!(
                "this account is locked for {} minute(s) after too many failed logins; try again later, or from a device that logged in before",
                mins(remaining)
            ),
        }
    }
}

/// A lockout that began: for the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lockout {
    Source { source: IpAddr, failures: u32 },
    User { user: String, failures: u32 },
}

/// What a wrong password did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The login's failures so far; `None` if the login had already ended
    /// (another request on its handle ended it, or it expired).
    pub login_failures: Option<u32>,
    /// Lockouts this failure started.
    pub lockouts: Vec<Lockout>,
}

/// Failures of one source or user in the current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

impl Window {
    fn current(&self, now: Instant, len: Duration) -> Option<u32> {
        (now.saturating_duration_since(self.start) < len).then_some(self.failures)
    }
}

/// Sources and users tracked at most; past that the oldest windows go.
const MAX_TRACKED: usize = 65_536;
/// Addresses remembered per user as familiar.
const FAMILIAR_PER_USER: usize = 8;

/// Logins in progress and failed-login accounting (pure: `now` is passed in).
pub struct LoginGuard {
    limits: Limits,
    /// Wrong passwords one login may have (`auth.max_failures`).
    max_failures: u32,
    /// How long a login may take (`auth.timeout_secs`).
    ttl: Duration,
    pending: HashMap<String, PendingLogin>,
    pending_per_source: HashMap<IpAddr, u32>,
    sources: HashMap<IpAddr, Window>,
    users: HashMap<String, Window>,
    /// Where each user logged in from lately, newest last.
    familiar: HashMap<String, VecDeque<(IpAddr, Instant)>>,
}

impl LoginGuard {
    pub fn new(limits: &Limits, auth: &AuthConfig) -> Self {
        LoginGuard {
            limits: limits.clone(),
            max_failures: auth.max_failures,
            ttl: Duration::from_secs(auth.timeout_secs),
            pending: HashMap::new(),
            pending_per_source: HashMap::new(),
            sources: HashMap::new(),
            users: HashMap::new(),
            familiar: HashMap::new(),
        }
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.limits.lockout_window_secs)
    }

    /// Forgets logins older than the login timeout.
    fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        let per_source = &mut self.pending_per_source;
        self.pending.retain(|_, p| {
            let live = now.saturating_duration_since(p.started) < ttl;
            if !live {
                release_one(per_source, p.key);
            }
            live
        });
    }

    /// Whether `source` is locked out now.
    fn source_locked(&self, key: IpAddr, now: Instant) -> Option<Duration> {
        let limit = self.limits.lockout_source_failures;
        let w = self.sources.get(&key)?;
        (limit > 0 && w.current(now, self.window())? >= limit).then(|| {
            self.window()
                .saturating_sub(now.saturating_duration_since(w.start))
        })
    }

    /// Starts a login with `handle` for `source`.
    pub fn start(
        &mut self,
        handle: String,
        group: String,
        source: IpAddr,
        now: Instant,
    ) -> Result<(), LoginRefused> {
        let key = source_key(source);
        if let Some(remaining) = self.source_locked(key, now) {
            return Err(LoginRefused::SourceLocked { remaining });
        }
        self.expire(now);
        if self.pending.len() >= self.limits.max_pending_logins {
            return Err(LoginRefused::Busy);
        }
        let n = self.pending_per_source.entry(key).or_insert(0);
        if *n >= self.limits.max_pending_logins_per_source {
            return Err(LoginRefused::SourceBusy);
        }
        *n += 1;
        self.pending.insert(
            handle,
            PendingLogin {
                group,
                failures: 0,
                challenge: None,
                key,
                started: now,
            },
        );
        Ok(())
    }

    /// The login `handle`, if it is in progress.
    pub fn get(&self, handle: &str, now: Instant) -> Option<&PendingLogin> {
        let ttl = self.ttl;
        self.pending
            .get(handle)
            .filter(|p| now.saturating_duration_since(p.started) < ttl)
    }

    /// Sets or clears the challenge login `handle` waits for; whether the
    /// login is in progress.
    pub fn set_challenge(&mut self, handle: &str, challenge: Option<Challenge>) -> bool {
        match self.pending.get_mut(handle) {
            Some(p) => {
                p.challenge = challenge;
                true
            }
            None => false,
        }
    }

    /// Whether `user` may try a password from `source` now (checked before
    /// the password, so a locked-out guess costs no argon2).
    pub fn may_try(&self, user: &str, source: IpAddr, now: Instant) -> Result<(), LoginRefused> {
        let key = source_key(source);
        if let Some(remaining) = self.source_locked(key, now) {
            return Err(LoginRefused::SourceLocked { remaining });
        }
        let limit = self.limits.lockout_user_failures;
        if let Some(w) = self.users.get(user)
            && limit > 0
            && w.current(now, self.window()).is_some_and(|f| f >= limit)
            && !self.is_familiar(user, key, now)
        {
            let remaining = self
                .window()
                .saturating_sub(now.saturating_duration_since(w.start));
            return Err(LoginRefused::UserLocked { remaining });
        }
        Ok(())
    }

    fn is_familiar(&self, user: &str, key: IpAddr, now: Instant) -> bool {
        let keep = Duration::from_secs(self.limits.familiar_days * 86_400);
        self.familiar.get(user).is_some_and(|f| {
            f.iter()
                .any(|(a, t)| *a == key && now.saturating_duration_since(*t) < keep)
        })
    }

    /// Counts a wrong password (or an unknown user) for login `handle`,
    /// `user` and `source`. A login at `max_failures` ends.
    pub fn failed(
        &mut self,
        handle: &str,
        user: Option<&str>,
        source: IpAddr,
        now: Instant,
    ) -> Failure {
        let key = source_key(source);
        let window = self.window();
        let mut lockouts = Vec::new();
        let (source_limit, user_limit) = (
            self.limits.lockout_source_failures,
            self.limits.lockout_user_failures,
        );
        let n = bump(&mut self.sources, key, now, window);
        if source_limit > 0 && n == source_limit {
            lockouts.push(Lockout::Source {
                source: key,
                failures: n,
            });
        }
        if let Some(user) = user {
            let n = bump(&mut self.users, user.to_owned(), now, window);
            if user_limit > 0 && n == user_limit {
                lockouts.push(Lockout::User {
                    user: user.to_owned(),
                    failures: n,
                });
            }
        }
        let login_failures = self.pending.get_mut(handle).map(|p| {
            p.failures += 1;
            p.failures
        });
        if login_failures.is_some_and(|f| f >= self.max_failures) {
            self.end(handle);
        }
        Failure {
            login_failures,
            lockouts,
        }
    }

    /// A login succeeded: it ends, and `source` becomes familiar for
    /// `user`. `false` if the login had already ended (then it earns
    /// nothing: one success per login).
    pub fn succeeded(&mut self, handle: &str, user: &str, source: IpAddr, now: Instant) -> bool {
        if !self.end(handle) {
            return false;
        }
        let key = source_key(source);
        if self.familiar.len() >= MAX_TRACKED && !self.familiar.contains_key(user) {
            // Forget the user whose latest login is oldest.
            if let Some(oldest) = self
                .familiar
                .iter()
                .min_by_key(|(_, f)| f.back().map(|(_, t)| *t))
                .map(|(u, _)| u.clone())
            {
                self.familiar.remove(&oldest);
            }
        }
        let f = self.familiar.entry(user.to_owned()).or_default();
        f.retain(|(a, _)| *a != key);
        f.push_back((key, now));
        if f.len() > FAMILIAR_PER_USER {
            f.pop_front();
        }
        true
    }

    /// Ends login `handle`; whether it was in progress.
    fn end(&mut self, handle: &str) -> bool {
        match self.pending.remove(handle) {
            Some(p) => {
                release_one(&mut self.pending_per_source, p.key);
                true
            }
            None => false,
        }
    }

    /// Logins in progress, sources and users locked out now.
    pub fn counts(&self, now: Instant) -> (usize, usize, usize) {
        let w = self.window();
        (
            self.pending.len(),
            locked(&self.sources, self.limits.lockout_source_failures, now, w),
            locked(&self.users, self.limits.lockout_user_failures, now, w),
        )
    }
}

/// Keys of `m` at or past `limit` failures in the current window.
fn locked<K>(m: &HashMap<K, Window>, limit: u32, now: Instant, len: Duration) -> usize {
    if limit == 0 {
        return 0;
    }
    m.values()
        .filter(|w| w.current(now, len).is_some_and(|f| f >= limit))
        .count()
}

fn release_one(m: &mut HashMap<IpAddr, u32>, key: IpAddr) {
    if let Some(n) = m.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(&key);
        }
    }
}

/// Adds a failure to `k`'s window (a new window if the last one ended);
/// returns the failures in the window. The map stays bounded: when full,
/// ended windows go, then the oldest.
fn bump<K: std::hash::Hash + Eq + Clone>(
    m: &mut HashMap<K, Window>,
    k: K,
    now: Instant,
    len: Duration,
) -> u32 {
    if m.len() >= MAX_TRACKED && !m.contains_key(&k) {
        m.retain(|_, w| w.current(now, len).is_some());
        if m.len() >= MAX_TRACKED
            && let Some(oldest) = m
                .iter()
                .min_by_key(|(_, w)| w.start)
                .map(|(k, _)| k.clone())
        {
            m.remove(&oldest);
        }
    }
    let w = m.entry(k).or_insert(Window {
        start: now,
        failures: 0,
    });
    if w.current(now, len).is_none() {
        *w = Window {
            start: now,
            failures: 0,
        };
    }
    w.failures += 1;
    w.failures
}

/// Password checks: at most `max_concurrent` at a time on blocking
/// threads, at most `max_queued` waiting. One source (an IPv4 address, an
/// IPv6 /64) runs at most half of them (at least one), and a slot that
/// frees goes to the waiting source that runs the fewest, first come first
/// served among equals: a storm of wrong passwords from one address
/// leaves the other half to everyone else, and another user's check
/// starts at the next free slot instead of behind the storm's queue. The
/// memory checks keep (argon2's, `users::release_argon2_memory`) is let
/// go after [`Verifier::QUIET`] without one.
pub struct Verifier {
    slots: Arc<Slots>,
    max_queued: usize,
    /// Running and waiting.
    in_progress: AtomicUsize,
    max_concurrent: usize,
    quiet: Arc<Quiet>,
}

/// The verifier's slots, shared out fairly between sources.
struct Slots {
    max: usize,
    per_source: usize,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    total: usize,
    running: HashMap<IpAddr, usize>,
    /// Waiting checks in arrival order; a closed sender is one given up.
    waiting: VecDeque<(IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl SlotState {
    fn running(&self, src: &IpAddr) -> usize {
        self.running.get(src).copied().unwrap_or(0)
    }

    fn take(&mut self, src: IpAddr) {
        self.total += 1;
        *self.running.entry(src).or_default() += 1;
    }

    fn give_back(&mut self, src: IpAddr) {
        self.total -= 1;
        if let Some(n) = self.running.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&src);
            }
        }
    }
}

/// A running check's slot, given back on drop.
struct Slot {
    slots: Arc<Slots>,
    src: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(self.src);
    }
}

/// A check waiting for a slot. Dropped after a slot was granted but
/// before the check saw it, it gives the slot back.
struct Waiting {
    rx: Option<tokio::sync::oneshot::Receiver<()>>,
    slots: Arc<Slots>,
    src: IpAddr,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.slots.release(self.src);
            }
        }
    }
}

impl Slots {
    async fn acquire(self: &Arc<Self>, src: IpAddr) -> Option<Slot> {
        let rx = {
            let mut s = self.state.lock();
            if s.total < self.max && s.running(&src) < self.per_source {
                s.take(src);
                return Some(Slot {
                    slots: self.clone(),
                    src,
                });
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.waiting.push_back((src, tx));
            rx
        };
        let mut w = Waiting {
            rx: Some(rx),
            slots: self.clone(),
            src,
        };
        let granted = w.rx.as_mut().expect("set above").await.is_ok();
        w.rx = None;
        granted.then(|| Slot {
            slots: self.clone(),
            src,
        })
    }

    /// Gives `src`'s slot back and grants free slots to the waiting
    /// sources that run the fewest.
    fn release(&self, src: IpAddr) {
        let mut s = self.state.lock();
        s.give_back(src);
        while s.total < self.max {
            s.waiting.retain(|(_, tx)| !tx.is_closed());
            let pick = s
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, (w, _))| s.running(w) < self.per_source)
                .min_by_key(|(i, (w, _))| (s.running(w), *i))
                .map(|(i, _)| i);
            let Some((w, tx)) = pick.and_then(|i| s.waiting.remove(i)) else {
                break;
            };
            s.take(w);
            if tx.send(()).is_err() {
                s.give_back(w);
            }
        }
    }
}

/// When checks last ended, and whether a task waits to let go of their
/// memory.
struct Quiet {
    checks: AtomicU64,
    pending: std::sync::atomic::AtomicBool,
    release: fn(),
}

/// The password check queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl Verifier {
    /// How long without a check before their memory is let go.
    pub const QUIET: Duration = Duration::from_secs(30);

    pub fn new(limits: &Limits) -> Self {
        Self::with_release(limits, super::users::release_argon2_memory)
    }

    /// A verifier that calls `release` after a quiet spell.
    pub fn with_release(limits: &Limits, release: fn()) -> Self {
        let max_concurrent = match limits.max_concurrent_verifications {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Verifier {
            slots: Arc::new(Slots {
                max: max_concurrent,
                per_source: (max_concurrent / 2).max(1),
                state: Mutex::default(),
            }),
            max_queued: limits.max_queued_verifications,
            in_progress: AtomicUsize::new(0),
            max_concurrent,
            quiet: Arc::new(Quiet {
                checks: AtomicU64::new(0),
                pending: Default::default(),
                release,
            }),
        }
    }

    /// A check ended: once none has for [`Verifier::QUIET`], their memory
    /// goes (one waiting task at a time).
    fn ended(&self) {
        let q = &self.quiet;
        q.checks.fetch_add(1, Ordering::Relaxed);
        if q.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let q = q.clone();
        tokio::spawn(async move {
            loop {
                let seen = q.checks.load(Ordering::Relaxed);
                tokio::time::sleep(Self::QUIET).await;
                if q.checks.load(Ordering::Relaxed) != seen {
                    continue;
                }
                (q.release)();
                q.pending.store(false, Ordering::Release);
                // A check that ended meanwhile found this task pending.
                if q.checks.load(Ordering::Relaxed) == seen
                    || q.pending.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }

    /// Runs `check` for a login from `source` on a blocking thread once
    /// the source gets a slot, or says the queue is full.
    pub async fn run<T: Send + 'static>(
        &self,
        source: IpAddr,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        struct InProgress<'a>(&'a AtomicUsize);
        impl Drop for InProgress<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let n = self.in_progress.fetch_add(1, Ordering::Relaxed);
        let _in_progress = InProgress(&self.in_progress);
        if n >= self.max_concurrent + self.max_queued {
            return Err(Busy);
        }
        let _slot = self.slots.acquire(source_key(source)).await.ok_or(Busy)?;
        let r = tokio::task::spawn_blocking(check).await.map_err(|_| Busy);
        self.ended();
        r
    }

    /// Checks running or waiting now.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_pending_logins: 4,
            max_pending_logins_per_source: 2,
            lockout_source_failures: 3,
            lockout_user_failures: 5,
            lockout_window_secs: 600,
            ..Limits::default()
        }
    }

    fn guard(limits: Limits) -> LoginGuard {
        LoginGuard::new(&limits, &AuthConfig::default())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pending_logins_are_bounded_in_total_and_per_source() {
        let now = Instant::now();
        let mut g = guard(limits());
        let a = ip("198.18.1.2");
        assert_eq!(g.start("h1".into(), "g".into(), a, now), Ok(()));
        assert_eq!(g.start("h2".into(), "g".into(), a, now), Ok(()));
        assert_eq!(
            g.start("h3".into(), "g".into(), a, now),
            Err(LoginRefused::SourceBusy)
        );
        // Another source still gets in, up to the total.
        for (h, b) in [("h4", "198.18.3.2"), ("h5", "198.18.3.3")] {
            assert_eq!(g.start(h.into(), "g".into(), ip(b), now), Ok(()));
        }
        assert_eq!(
            g.start("h6".into(), "g".into(), ip("198.18.3.4"), now),
            Err(LoginRefused::Busy)
        );
        // A login that ends frees its source's place; expired ones too.
        assert!(g.succeeded("h1", "alice", a, now));
        assert_eq!(g.start("h7".into(), "g".into(), a, now), Ok(()));
        let later = now + Duration::from_secs(AuthConfig::default().timeout_secs);
        assert!(g.get("h2", later).is_none(), "expired");
        assert_eq!(g.start("h8".into(), "g".into(), a, later), Ok(()));
        assert_eq!(g.counts(later).0, 1);
    }

    #[test]
    fn a_login_ends_at_its_failure_limit_and_succeeds_once() {
        let now = Instant::now();
        let mut g = LoginGuard::new(
            &limits(),
            &AuthConfig {
                max_failures: 2,
                ..AuthConfig::default()
            },
        );
        let a = ip("198.18.1.2");
        g.start("h".into(), "g".into(), a, now).unwrap();
        assert_eq!(g.failed("h", Some("alice"), a, now).login_failures, Some(1));
        assert_eq!(g.failed("h", Some("alice"), a, now).login_failures, Some(2));
        assert!(g.get("h", now).is_none(), "ended at the limit");
        // A reply still in flight finds the login gone: expired, no panic.
        assert_eq!(g.failed("h", Some("alice"), a, now).login_failures, None);
        assert!(
            !g.succeeded("h", "alice", a, now),
            "no success on an ended login"
        );
    }

    #[test]
    fn a_source_is_locked_out_after_its_failures_until_the_window_ends() {
        let now = Instant::now();
        let mut g = guard(limits());
        let (a, b) = (ip("198.18.3.2"), ip("198.18.1.2"));
        let mut lockouts = Vec::new();
        for i in 0..3 {
            // A new login (handle) and user each time: the source's count
            // goes on.
            lockouts.extend(
                g.failed(&format!("h{i}"), Some(&format!("u{i}")), a, now)
                    .lockouts,
            );
        }
        assert_eq!(
            lockouts,
            vec![Lockout::Source {
                source: a,
                failures: 3
            }]
        );
        assert!(matches!(
            g.may_try("alice", a, now),
            Err(LoginRefused::SourceLocked { .. })
        ));
        assert!(matches!(
            g.start("x".into(), "g".into(), a, now),
            Err(LoginRefused::SourceLocked { .. })
        ));
        assert_eq!(
            g.may_try("alice", b, now),
            Ok(()),
            "others are not affected"
        );
        assert_eq!(g.counts(now).1, 1);
        let end = now + Duration::from_secs(600);
        assert_eq!(g.may_try("alice", a, end), Ok(()), "the window ended");
    }

    #[test]
    fn a_locked_user_still_logs_in_from_a_familiar_address() {
        let now = Instant::now();
        let mut g = guard(limits());
        let home = ip("198.18.1.2");
        g.start("ok".into(), "g".into(), home, now).unwrap();
        assert!(g.succeeded("ok", "alice", home, now));
        // A stranger guesses from several addresses (under each source's
        // limit) until the user's limit.
        let mut lockouts = Vec::new();
        for i in 0..5u8 {
            let s = ip(&format!("198.18.3.{}", 10 + i));
            lockouts.extend(g.failed("none", Some("alice"), s, now).lockouts);
        }
        assert_eq!(
            lockouts,
            vec![Lockout::User {
                user: "alice".into(),
                failures: 5
            }]
        );
        assert!(matches!(
            g.may_try("alice", ip("198.18.3.99"), now),
            Err(LoginRefused::UserLocked { .. })
        ));
        assert_eq!(g.may_try("alice", home, now), Ok(()), "her own device");
        assert_eq!(g.may_try("bob", ip("198.18.3.99"), now), Ok(()));
        assert!(
            LoginRefused::UserLocked {
                remaining: Duration::from_secs(61)
            }
            .message()
            .contains("2 minute(s)")
        );
    }

    #[test]
    fn limits_of_zero_turn_lockouts_off() {
        let now = Instant::now();
        let mut g = guard(Limits {
            lockout_source_failures: 0,
            lockout_user_failures: 0,
            ..limits()
        });
        let a = ip("198.18.3.2");
        for _ in 0..50 {
            assert!(g.failed("none", Some("alice"), a, now).lockouts.is_empty());
        }
        assert_eq!(g.may_try("alice", a, now), Ok(()));
    }

    #[test]
    fn connections_are_bounded_in_total_and_per_source_until_they_become_tunnels() {
        let c = Connections::new(&Limits {
            max_connections: 3,
            max_connections_per_source: 2,
            ..Limits::default()
        });
        let (a, b) = (ip("198.18.3.2"), ip("198.18.1.2"));
        let a1 = c.admit(a).unwrap();
        let a2 = c.admit(a).unwrap();
        assert_eq!(c.admit(a).err(), Some(ConnectionRefused::Source));
        let b1 = c.admit(b).unwrap();
        assert_eq!(c.admit(b).err(), Some(ConnectionRefused::Total));
        drop(a1);
        let a3 = c.admit(a).unwrap();
        a2.into_tunnel();
        assert_eq!(c.open(), 2);
        drop((a3, b1));
        assert_eq!(c.open(), 0);
    }

    /// argon2's kept memory goes after a quiet spell, not while checks go
    /// on, and again after later checks.
    #[tokio::test(start_paused = true)]
    async fn the_checks_memory_goes_after_a_quiet_spell() {
        static RELEASED: AtomicUsize = AtomicUsize::new(0);
        fn release() {
            RELEASED.fetch_add(1, Ordering::SeqCst);
        }
        let v = Verifier::with_release(&Limits::default(), release);
        let released = || RELEASED.load(Ordering::SeqCst);
        for _ in 0..5 {
            v.run(ip("198.18.1.2"), || ()).await.unwrap();
            tokio::time::sleep(Verifier::QUIET / 3).await;
        }
        assert_eq!(released(), 0, "checks went on");
        tokio::time::sleep(Verifier::QUIET * 2).await;
        assert_eq!(released(), 1);
        tokio::time::sleep(Verifier::QUIET * 3).await;
        assert_eq!(released(), 1, "once per quiet spell");
        v.run(ip("198.18.1.2"), || ()).await.unwrap();
        tokio::time::sleep(Verifier::QUIET * 2).await;
        assert_eq!(released(), 2);
    }

    #[tokio::test]
    async fn verifications_beyond_the_queue_are_refused_at_once() {
        let v = Arc::new(Verifier::new(&Limits {
            max_concurrent_verifications: 1,
            max_queued_verifications: 1,
            ..Limits::default()
        }));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let slow = |rx: Arc<Mutex<std::sync::mpsc::Receiver<()>>>| {
            move || {
                let _ = rx.lock().recv();
            }
        };
        let first = tokio::spawn({
            let (v, rx) = (v.clone(), rx.clone());
            async move { v.run(ip("198.18.1.2"), slow(rx)).await }
        });
        let second = tokio::spawn({
            let (v, rx) = (v.clone(), rx.clone());
            async move { v.run(ip("198.18.1.2"), slow(rx)).await }
        });
        while v.in_progress() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(v.run(ip("198.18.1.2"), || ()).await, Err(Busy));
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(second.await.unwrap(), Ok(()));
        assert_eq!(v.in_progress(), 0);
        assert_eq!(v.run(ip("198.18.1.2"), || 7).await, Ok(7));
    }

    /// One source storming password checks gets at most half the slots,
    /// and a freed slot goes to the source running the fewest: another
    /// user's check starts at once, not behind the storm's queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storm_from_one_source_leaves_slots_for_the_others() {
        let v = Arc::new(Verifier::new(&Limits {
            max_concurrent_verifications: 2,
            max_queued_verifications: 16,
            ..Limits::default()
        }));
        let storm = ip("198.18.3.2");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let started = Arc::new(AtomicUsize::new(0));
        let mut stormers = Vec::new();
        for _ in 0..6 {
            let (v, rx, started) = (v.clone(), rx.clone(), started.clone());
            stormers.push(tokio::spawn(async move {
                v.run(storm, move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.lock().recv();
                })
                .await
            }));
        }
        // The first check starts (a blocking thread can take a while on a
        // loaded machine); then no second one does while it runs.
        let t0 = std::time::Instant::now();
        while v.in_progress() < 6 || started.load(Ordering::SeqCst) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the storm never started"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "the storm holds one of two slots"
        );
        // Another source's check runs now, while the storm waits.
        let alice =
            tokio::time::timeout(Duration::from_secs(5), v.run(ip("198.18.1.2"), || "alice")).await;
        assert_eq!(alice, Ok(Ok("alice")));
        for _ in 0..6 {
            tx.send(()).unwrap();
        }
        for s in stormers {
            assert_eq!(s.await.unwrap(), Ok(()));
        }
        assert_eq!(started.load(Ordering::SeqCst), 6);
        assert_eq!(v.in_progress(), 0);
    }
}
