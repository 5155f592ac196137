//! The session manager: every session's life, from login to its end, and
//! the state that goes with it. It owns the session table, the address
//! pool, the data path's session entries and the policy set, and with them
//! the lock order, written down here once:
//!
//! > pool, then policies, then datapath (and the table's own lock inside
//! > any of them, never around one).
//!
//! Creating a session (a login) reserves an address, resolves the user's
//! policy and installs the BPF entries; ending one (logout, admin, timeout,
//! a user removed) removes them, frees the address, tells the client and
//! logs the event; a reload or a schedule moves live sessions to their new
//! policies all or none.

use std::{
    net::IpAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use parking_lot::Mutex;
use vpn_common::SessionInfo;

use crate::{
    auth::{
        AuthSource, Grant,
        accounting::{self, Accounting},
        users::UserDb,
    },
    config::Settings,
    datapath::bpf::SharedDatapath,
    events::{Event, EventLog},
    mac::pseudo_mac,
    policies::{MissingPolicy, PolicyError, PolicySet},
    proto::identity::{Mapping, Op},
    session::{
        EndReason, Kick, OwnTimeouts, PolicyBinding, Session, SessionTable, Timeouts, TunnelSlot,
        journal::Journal, new_cookie, persist, pool::Pool,
    },
};

/// Why a session's policy could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyChangeError {
    #[error(transparent)]
    Missing(#[from] MissingPolicy),
    #[error(transparent)]
    Move(#[from] PolicyError),
}

/// What a RADIUS Disconnect- or CoA-Request identifies sessions by; an
/// attribute it does not carry matches every session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionIdentity {
    pub user: Option<String>,
    pub acct_session_id: Option<String>,
    pub framed_v4: Option<std::net::Ipv4Addr>,
    pub calling_station: Option<String>,
}

impl SessionIdentity {
    /// Whether it names anything at all.
    pub fn is_empty(&self) -> bool {
        *self == SessionIdentity::default()
    }
}

/// The limits a manager enforces.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Sessions at once (`server.max_sessions`).
    pub max_sessions: usize,
    /// Sessions one user may hold (`session.max_per_user`; 0 = no limit).
    pub max_per_user: usize,
    pub timeouts: Timeouts,
}

impl SessionLimits {
    pub fn from_settings(s: &Settings) -> Self {
        SessionLimits {
            max_sessions: s.session.max_sessions,
            max_per_user: s.session.max_per_user,
            timeouts: Timeouts {
                session: s.tunnel.session_timeout,
                idle: s.session.idle,
                disconnected: s.session.disconnected,
            },
        }
    }
}

/// Why a login earns no session: what the client is told.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionRefused {
    #[error("{0}; the login is refused (ask your administrator to fix your account)")]
    NoPolicy(MissingPolicy),
    #[error("the gateway has reached its limit of {max} concurrent sessions; try again later")]
    GatewayFull { max: usize },
    #[error(
        "you already have {max} sessions, the most this gateway allows per user; disconnect one of them first"
    )]
    UserLimit { max: usize },
    #[error("no free address in the VPN pool; try again later")]
    PoolExhausted,
    #[error("the gateway could not set up the session; try again later")]
    Datapath,
}

/// `vpnctl disconnect TARGET` found nothing to end.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no session matches '{0}' (give a user name or a VPN address)")]
pub struct NoSessionMatches(pub String);

/// Called with a session's id when it ends (the DTLS server closes its
/// channel).
pub type EndHook = Box<dyn Fn(u64) + Send + Sync>;

/// Every session and what they hold; see the module docs.
pub struct SessionManager {
    table: Arc<SessionTable>,
    pool: Mutex<Pool>,
    policies: Mutex<PolicySet>,
    datapath: SharedDatapath,
    events: Arc<EventLog>,
    /// Users' own policies (re-read at each rebind) and their changes.
    users: Arc<UserDb>,
    limits: SessionLimits,
    /// What enforcing policies let clients reach (`Settings::split_allow`).
    split_allow: Vec<IpNet>,
    on_end: OnceLock<EndHook>,
    /// RADIUS accounting, when on: a Start and Stop for every session.
    accounting: OnceLock<Arc<Accounting>>,
    /// Spoofed packets of sessions that have ended (live sessions count
    /// their own).
    ended_spoofed: AtomicU64,
    /// The counters of sessions that ended (metrics count from start).
    ended_traffic: Mutex<vpn_common::SessionStats>,
    /// Who holds which address, change by change (the identity feed).
    journal: Arc<Journal>,
}

impl SessionManager {
    /// A manager for `settings`' pools and limits, with its policies
    /// installed.
    pub fn new(
        settings: &Settings,
        datapath: SharedDatapath,
        events: Arc<EventLog>,
        users: Arc<UserDb>,
    ) -> Result<Arc<Self>, PolicyError> {
        let m = Arc::new(SessionManager {
            table: Arc::default(),
            pool: Mutex::new(Pool::new(settings.pool_v4, settings.pool_v6)),
            policies: Mutex::new(PolicySet::default()),
            datapath,
            events,
            users,
            limits: SessionLimits::from_settings(settings),
            split_allow: settings.split_allow.clone(),
            on_end: OnceLock::new(),
            accounting: OnceLock::new(),
            ended_spoofed: AtomicU64::new(0),
            ended_traffic: Mutex::default(),
            journal: Arc::new(Journal::new(settings.identity_history)),
        });
        m.apply_policies(settings)?;
        Ok(m)
    }

    /// Sends every session's accounting to `a` from now on (set once).
    pub fn set_accounting(&self, a: Arc<Accounting>) {
        let _ = self.accounting.set(a);
    }

    /// Traffic of every session since start: the ended ones' and the
    /// live ones' counters.
    pub fn traffic_totals(&self) -> vpn_common::SessionStats {
        let mut t = *self.ended_traffic.lock();
        let stats = self.datapath.lock().all_session_stats();
        for s in self.table.all() {
            t.add(&stats.of(s.addresses()));
        }
        t
    }

    /// What accounting sent, when it is on.
    pub fn accounting_stats(&self) -> Option<crate::api::AccountingStats> {
        let c = &self.accounting.get()?.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(crate::api::AccountingStats {
            sent: n(&c.sent),
            failed: n(&c.failed),
            dropped: n(&c.dropped),
            pending: n(&c.pending),
        })
    }

    /// An accounting record of `s` with `stats`.
    fn account(
        &self,
        s: &Session,
        status: accounting::Status,
        stats: &vpn_common::SessionStats,
        cause: Option<EndReason>,
    ) {
        let Some(a) = self.accounting.get() else {
            return;
        };
        if s.auth_source != AuthSource::Radius {
            return;
        }
        a.record(accounting::Record {
            status,
            session_id: accounting::session_id(s.id, s.created),
            user: s.user.clone(),
            framed_v4: s.lease.v4,
            framed_v6: s.lease.v6,
            client: s.login_from,
            class: s.class.clone(),
            session_time: s.started.elapsed(),
            counters: accounting::Counters {
                input_octets: stats.rx_bytes,
                output_octets: stats.tx_bytes,
                input_packets: stats.rx_packets,
                output_packets: stats.tx_packets,
            },
            cause,
        });
    }

    /// Sends an Interim-Update for every session each `every`.
    pub async fn report_interim(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let all = self.datapath.lock().all_session_stats();
            for s in self.table.all() {
                let stats = all.of(s.addresses());
                self.account(&s, accounting::Status::InterimUpdate, &stats, None);
            }
        }
    }

    /// Who holds which address: the identity feed's source.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Records `op` on `s` in the journal and the event log.
    fn record_identity(&self, op: Op, s: &Session) {
        let policy = s.policy.lock().effective.clone();
        let change = self.journal.record(
            op,
            Mapping {
                session_id: s.id,
                user: s.user.clone(),
                group: s.group.clone(),
                groups: s.groups.clone(),
                policy: policy.clone(),
                address: s.lease.v4,
                address6: s.lease.v6,
                since: humantime::format_rfc3339_seconds(s.created).to_string(),
            },
        );
        self.events.emit(Event::IdentityChanged {
            seq: change.seq,
            op: op.name(),
            session_id: s.id,
            user: s.user.clone(),
            group: s.group.clone(),
            groups: s.groups.clone(),
            policy,
            vpn_address: s.lease.v4.to_string(),
            vpn_address6: s.lease.v6.map(|a| a.to_string()),
        });
    }

    /// Calls `hook` with each session's id when it ends (set once).
    pub fn on_end(&self, hook: EndHook) {
        let _ = self.on_end.set(hook);
    }

    /// The limits it enforces (the configured timeouts among them).
    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    /// The session table (lookups by cookie, address, id).
    pub fn table(&self) -> &Arc<SessionTable> {
        &self.table
    }

    /// The data path the sessions' entries live in.
    pub fn datapath(&self) -> &SharedDatapath {
        &self.datapath
    }

    /// The installed policies.
    pub fn policies(&self) -> parking_lot::MutexGuard<'_, PolicySet> {
        self.policies.lock()
    }

    /// Addresses in use and in the pool.
    pub fn pool_usage(&self) -> (usize, u32) {
        let pool = self.pool.lock();
        (pool.in_use(), pool.capacity())
    }

    /// Packets clients sent with another source than their own, all told.
    pub fn spoofed_total(&self) -> u64 {
        self.ended_spoofed.load(Ordering::Relaxed)
            + self
                .table
                .all()
                .iter()
                .map(|s| s.spoofed_dropped.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// Installs the policies of `settings` (at start and on reload): all
    /// or nothing. If a session cannot be moved to its new policy, the
    /// sessions already moved go back and the new versions are removed,
    /// so "rejected, the running configuration stays" is true.
    pub fn apply_policies(&self, settings: &Settings) -> Result<(), PolicyError> {
        let mut policies = self.policies.lock();
        let applied = policies.apply(
            &mut **self.datapath.lock(),
            &settings.policies,
            settings.default_policy.clone(),
            // The split list clients were given at connect time.
            &self.split_allow,
            settings.max_policy_entries,
        )?;
        // Re-resolve every session against the new set (users may have
        // new policies too), then drop the versions nobody uses.
        match self.rebind(&policies) {
            Ok(orphans) => {
                policies.retire(&mut **self.datapath.lock(), applied.old);
                drop(policies);
                self.end_orphans(orphans);
                Ok(())
            }
            Err(e) => {
                policies.rollback(&mut **self.datapath.lock(), applied);
                Err(e)
            }
        }
    }

    /// Ends the sessions [`Self::rebind_sessions`] found without a policy
    /// (fail closed: never leave a session on a policy that is gone, nor
    /// silently widen its access). Called without the policy lock, which
    /// `end_session`'s locks must not nest in.
    fn end_orphans(&self, orphans: Vec<(u64, EndReason)>) {
        for (id, why) in orphans {
            self.end(id, why);
        }
    }

    /// Re-resolves every session's policy (users' own policies re-read,
    /// schedules evaluated now) and moves the sessions whose policy
    /// changed, all or none: if one BPF update fails, those done are
    /// undone and the error returned. Returns the sessions whose policy no
    /// longer exists, for [`Self::end_orphans`].
    fn rebind(&self, policies: &PolicySet) -> Result<Vec<(u64, EndReason)>, PolicyError> {
        // Policies may change: `session.persist` saves again.
        self.table.changed.notify_one();
        let mut moves = Vec::new();
        let mut writes = Vec::new();
        let mut orphans = Vec::new();
        for s in self.table.all() {
            // Local users follow the database; RADIUS, LDAP and
            // certificate sessions keep what they were granted.
            let local = (s.auth_source == AuthSource::Local)
                .then(|| self.users.policy_of(&s.user))
                .flatten();
            let own = match local {
                Some(own) => own,
                None => s.policy.lock().own.clone(),
            };
            match policies.resolve(own.as_deref()) {
                Ok(p) => {
                    let rates = p.as_ref().map_or((0, 0), |p| {
                        (p.def.info.rate_up_bps, p.def.info.rate_down_bps)
                    });
                    let binding = PolicyBinding {
                        own,
                        effective: p.as_ref().map(|p| p.def.name.clone()),
                        proxy_pac: p.as_ref().and_then(|p| p.def.proxy_pac.clone()),
                        id: p.map_or(0, |p| p.id),
                    };
                    let old_id = s.policy.lock().id;
                    if binding.id != old_id {
                        let info = |policy_id| SessionInfo {
                            session_id: s.id,
                            policy_id,
                            flags: 0,
                        };
                        for a in s.addresses() {
                            writes.push((a, info(binding.id), info(old_id)));
                        }
                    }
                    moves.push((s, binding, rates));
                }
                Err(e) => orphans.push((s.id, EndReason::PolicyGone(e.0))),
            }
        }
        {
            let mut dp = self.datapath.lock();
            write_all_or_none(&writes, |a, info| dp.set_session(a, info))
                .map_err(PolicyError::MoveSessions)?;
        }
        for (s, binding, (up, down)) in moves {
            s.rate_up_bps.store(up, Ordering::Relaxed);
            s.rate_down_bps.store(down, Ordering::Relaxed);
            let mut current = s.policy.lock();
            if *current != binding {
                tracing::info!(user = s.user, policy = ?binding.effective, "session policy changed");
                let moved = current.effective != binding.effective;
                *current = binding;
                drop(current);
                if moved {
                    self.record_identity(Op::Update, &s);
                }
            }
        }
        Ok(orphans)
    }

    /// Switches sessions between scheduled policies and their fallbacks
    /// when a schedule window opens or closes (checked every 15 s).
    pub async fn follow_schedules(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        let mut last = Vec::new();
        loop {
            tick.tick().await;
            let now = crate::policy::local_now();
            let policies = self.policies.lock();
            let state = policies.schedule_state(now);
            if state != last {
                last = state;
                let r = self.rebind(&policies);
                drop(policies);
                match r {
                    Ok(orphans) => self.end_orphans(orphans),
                    Err(e) => tracing::error!("applying policy schedules: {e}"),
                }
            }
        }
    }

    /// Creates a session for an authenticated user, or says why not.
    pub fn create(
        &self,
        user: &str,
        group: &str,
        grant: &Grant,
        client: IpAddr,
    ) -> Result<(Arc<Session>, String), SessionRefused> {
        let group_policy = grant.own_policy.clone();
        let max = self.limits.max_sessions;
        let per_user = self.limits.max_per_user;
        if per_user > 0 {
            // At the limit, the oldest session without a tunnel makes way
            // (a client that logged in again after losing its network).
            let mine: Vec<_> = self
                .table
                .all()
                .into_iter()
                .filter(|s| s.user == user)
                .collect();
            if mine.len() >= per_user
                && let Some(idle) = mine.iter().find(|s| s.tunnel.lock().handle.is_none())
            {
                self.end(idle.id, EndReason::ReplacedByNewerLogin);
            }
        }
        // The pool lock also serialises the limit check with the insert.
        // Lock order: pool, policies, datapath.
        let mut pool = self.pool.lock();
        let policies = self.policies.lock();
        let (binding, (up_rate, down_rate)) = match policies.resolve(group_policy.as_deref()) {
            Ok(p) => (
                PolicyBinding {
                    own: group_policy,
                    effective: p.as_ref().map(|p| p.def.name.clone()),
                    proxy_pac: p.as_ref().and_then(|p| p.def.proxy_pac.clone()),
                    id: p.as_ref().map_or(0, |p| p.id),
                },
                p.map_or((0, 0), |p| {
                    (p.def.info.rate_up_bps, p.def.info.rate_down_bps)
                }),
            ),
            Err(e) => return Err(SessionRefused::NoPolicy(e)),
        };
        if self.table.len() >= max {
            return Err(SessionRefused::GatewayFull { max });
        }
        // Checked again under the pool lock, which serialises logins: two
        // at once cannot both take the last place.
        if per_user > 0 && self.table.count_of(user) >= per_user {
            return Err(SessionRefused::UserLimit { max: per_user });
        }
        let lease = pool
            .allocate_wanted(user, grant.framed_v4)
            .ok_or(SessionRefused::PoolExhausted)?;
        if let Some(wanted) = grant.framed_v4
            && wanted != lease.v4
        {
            tracing::warn!(
                "{user}: the assigned address {wanted} is not a free address of the pool; {} instead",
                lease.v4
            );
        }
        let now = Instant::now();
        let session = Arc::new(new_session(Granted {
            id: self.table.next_id(),
            user,
            group,
            binding: binding.clone(),
            rates: (up_rate, down_rate),
            lease,
            client,
            created: SystemTime::now(),
            started: now,
            own_timeouts: OwnTimeouts {
                session: grant.session_timeout,
                idle: grant.idle_timeout,
            },
            class: grant.class.clone(),
            groups: grant.groups.clone(),
            auth_source: grant.source,
        }));
        {
            let mut dp = self.datapath.lock();
            if let Err(e) = install(&mut **dp, &session, binding.id, Default::default()) {
                pool.release(lease.v4);
                tracing::error!("cannot install session in BPF maps: {e}");
                return Err(SessionRefused::Datapath);
            }
        }
        drop(policies);
        let cookie = new_cookie();
        self.table.insert(session.clone(), &cookie);
        self.record_identity(Op::Add, &session);
        self.account(
            &session,
            accounting::Status::Start,
            &Default::default(),
            None,
        );
        Ok((session, cookie))
    }
    /// The sessions a RADIUS Disconnect- or CoA-Request names: every one
    /// that matches all the identifying attributes it has (User-Name,
    /// Acct-Session-Id, Framed-IP-Address, Calling-Station-Id).
    pub fn matching(&self, who: &SessionIdentity) -> Vec<Arc<Session>> {
        self.table
            .all()
            .into_iter()
            .filter(|s| {
                who.user.as_ref().is_none_or(|u| *u == s.user)
                    && who
                        .acct_session_id
                        .as_ref()
                        .is_none_or(|a| *a == accounting::session_id(s.id, s.created))
                    && who.framed_v4.is_none_or(|a| a == s.lease.v4)
                    && who
                        .calling_station
                        .as_ref()
                        .is_none_or(|c| *c == s.login_from.to_string())
            })
            .collect()
    }

    /// Moves session `id` to its own group policy `policy` at once (a
    /// RADIUS CoA-Request's Filter-Id). A name no policy has changes
    /// nothing.
    pub fn set_own_policy(&self, s: &Session, policy: &str) -> Result<(), PolicyChangeError> {
        let policies = self.policies.lock();
        policies.resolve(Some(policy))?;
        let before = s.policy.lock().own.replace(policy.to_owned());
        let r = self.rebind(&policies);
        drop(policies);
        match r {
            Ok(orphans) => {
                self.end_orphans(orphans);
                Ok(())
            }
            Err(e) => {
                s.policy.lock().own = before;
                Err(e.into())
            }
        }
    }

    /// The table as `session.persist` saves it.
    pub fn snapshot(&self) -> persist::Saved {
        let stats = self.datapath.lock().all_session_stats();
        let mut sessions: Vec<persist::SavedSession> = self
            .table
            .with_cookie_hashes()
            .into_iter()
            .map(|(s, hash)| persist::SavedSession {
                id: s.id,
                user: s.user.clone(),
                group: s.group.clone(),
                own_policy: s.policy.lock().own.clone(),
                v4: s.lease.v4,
                v6: s.lease.v6,
                login_from: s.login_from,
                created_ms: persist::unix_ms(s.created),
                session_timeout_secs: s.own_timeouts.session.map(|d| d.as_secs()),
                idle_timeout_secs: s.own_timeouts.idle.map(|d| d.as_secs()),
                class: s.class.iter().map(hex::encode).collect(),
                groups: s.groups.clone(),
                auth_source: s.auth_source,
                cookie_sha256: hex::encode(hash),
                credential: (s.auth_source == AuthSource::Local)
                    .then(|| self.users.credential_tag(&s.user))
                    .flatten(),
                counters: stats.of(s.addresses()),
            })
            .collect();
        sessions.sort_by_key(|s| s.id);
        persist::Saved::new(sessions)
    }

    /// Puts saved sessions back (`session.persist`, at start): each with
    /// its addresses, policy, timers, counters and cookie, waiting for its
    /// client's CONNECT. Returns how many, and why each other was left out.
    pub fn restore(&self, saved: persist::Saved) -> (usize, Vec<String>) {
        let (now, now_sys) = (Instant::now(), SystemTime::now());
        let mut restored = 0;
        let mut left_out = Vec::new();
        let mut max_id = 0;
        // Lock order: pool, policies, datapath.
        let mut pool = self.pool.lock();
        let policies = self.policies.lock();
        for r in saved.sessions {
            let who = format!("session {} of {} ({})", r.id, r.user, r.v4);
            let mut leave = |why: String| left_out.push(format!("{who}: {why}"));
            let age = now_sys
                .duration_since(persist::from_unix_ms(r.created_ms))
                .unwrap_or_default();
            let own_timeouts = OwnTimeouts {
                session: r.session_timeout_secs.map(Duration::from_secs),
                idle: r.idle_timeout_secs.map(Duration::from_secs),
            };
            let limit = own_timeouts.apply(&self.limits.timeouts).session;
            if !limit.is_zero() && age >= limit {
                leave("its session time is up".into());
                continue;
            }
            let hash: Option<[u8; 32]> = hex::decode(&r.cookie_sha256)
                .ok()
                .and_then(|h| h.try_into().ok());
            let class: Option<Vec<Vec<u8>>> = r.class.iter().map(|c| hex::decode(c).ok()).collect();
            let auth_source = r.auth_source;
            let (Some(hash), Some(class)) = (hash, class) else {
                leave("its record is damaged".into());
                continue;
            };
            // A local user follows the database, as `watch_users` would
            // have had vpnd been up.
            let mut own_policy = r.own_policy.clone();
            if auth_source == AuthSource::Local {
                let Some(policy) = self.users.policy_of(&r.user) else {
                    leave("the user is no longer in the user database".into());
                    continue;
                };
                if r.credential.is_some() && self.users.credential_tag(&r.user) != r.credential {
                    leave("the user's password changed".into());
                    continue;
                }
                own_policy = policy;
            }
            let (binding, rates) = match policies.resolve(own_policy.as_deref()) {
                Ok(p) => (
                    PolicyBinding {
                        own: own_policy.clone(),
                        effective: p.as_ref().map(|p| p.def.name.clone()),
                        proxy_pac: p.as_ref().and_then(|p| p.def.proxy_pac.clone()),
                        id: p.as_ref().map_or(0, |p| p.id),
                    },
                    p.map_or((0, 0), |p| {
                        (p.def.info.rate_up_bps, p.def.info.rate_down_bps)
                    }),
                ),
                Err(e) => {
                    leave(e.to_string());
                    continue;
                }
            };
            if self.table.len() >= self.limits.max_sessions {
                leave("the gateway is full (server.max_sessions)".into());
                continue;
            }
            let Some(lease) = pool.reserve(r.v4) else {
                leave("the address is not a free address of the pool".into());
                continue;
            };
            if lease.v6 != r.v6 {
                pool.release(lease.v4);
                leave(format!(
                    "its IPv6 address {:?} is not the pool's for {} now",
                    r.v6, r.v4
                ));
                continue;
            }
            let session = new_session(Granted {
                id: r.id,
                user: &r.user,
                group: &r.group,
                binding: binding.clone(),
                rates,
                lease,
                client: r.login_from,
                created: persist::from_unix_ms(r.created_ms),
                // Its timers go on from where they were (from now, on a
                // host whose clock restarted).
                started: now.checked_sub(age).unwrap_or(now),
                own_timeouts,
                class,
                groups: r.groups.clone(),
                auth_source,
            });
            // Not idle for the time it spent saved.
            session.last_activity_ms.store(
                u64::try_from(now.duration_since(session.started).as_millis()).unwrap_or(0),
                Ordering::Relaxed,
            );
            let mut dp = self.datapath.lock();
            if let Err(e) = install(&mut **dp, &session, binding.id, r.counters) {
                drop(dp);
                pool.release(lease.v4);
                leave(format!("its BPF entries: {e}"));
                continue;
            }
            drop(dp);
            max_id = max_id.max(r.id);
            let session = Arc::new(session);
            self.table.insert_hashed(session.clone(), hash);
            self.record_identity(Op::Add, &session);
            restored += 1;
        }
        self.table.ids_above(max_id);
        (restored, left_out)
    }

    /// Writes the table to `path` now.
    pub fn save(&self, path: &std::path::Path) -> anyhow::Result<usize> {
        let saved = self.snapshot();
        persist::write(path, &saved)?;
        Ok(saved.sessions.len())
    }

    /// Saves the table to `path` shortly after each change, and every
    /// [`persist::REFRESH`] while sessions exist, for the daemon's life.
    pub async fn save_on_change(self: Arc<Self>, path: std::path::PathBuf) {
        let mut saved_empty = false;
        loop {
            let changed =
                tokio::time::timeout(persist::REFRESH, self.table.changed.notified()).await;
            if changed.is_err() && saved_empty && self.table.is_empty() {
                continue;
            }
            tokio::time::sleep(persist::COALESCE).await;
            let (m, p) = (self.clone(), path.clone());
            match tokio::task::spawn_blocking(move || m.save(&p)).await {
                Ok(Ok(n)) => saved_empty = n == 0,
                Ok(Err(e)) => tracing::error!("session.persist: saving the sessions: {e:#}"),
                Err(e) => tracing::error!("session.persist: saving the sessions: {e}"),
            }
        }
    }

    /// Closes every tunnel without ending its session (a stop with
    /// `session.persist`): the clients reconnect with their cookies.
    pub fn close_tunnels_for_restart(&self) {
        for s in self.table.all() {
            if let Some(h) = s.tunnel.lock().handle.take()
                && let Some(k) = h.kick
            {
                let _ = k.send(Kick::Replaced);
            }
        }
    }

    /// Ends the sessions `target` names (user name or VPN address).
    pub fn disconnect(&self, target: &str) -> Result<usize, NoSessionMatches> {
        let ip: Option<std::net::IpAddr> = target.parse().ok();
        let matching: Vec<u64> = self
            .table
            .all()
            .iter()
            .filter(|s| match ip {
                Some(ip) => s.addresses().any(|a| a == ip),
                None => s.user == target,
            })
            .map(|s| s.id)
            .collect();
        if matching.is_empty() {
            return Err(NoSessionMatches(target.to_owned()));
        }
        Ok(matching
            .into_iter()
            .filter(|id| self.end(*id, EndReason::Administrator))
            .count())
    }

    /// Ends a session for good: closes its tunnel (telling the client),
    /// frees its address and BPF entries and logs the event. Idempotent.
    pub fn end(&self, id: u64, reason: EndReason) -> bool {
        let Some(s) = self.table.remove(id) else {
            return false;
        };
        tracing::debug!(parent: &s.span, "ending session: {reason}");
        if let Some(h) = s.tunnel.lock().handle.take()
            && let Some(k) = h.kick
        {
            let _ = k.send(Kick::Terminate(reason.clone()));
        }
        if let Some(hook) = self.on_end.get() {
            hook(s.id);
        }
        let mut stats = vpn_common::SessionStats::default();
        {
            let mut dp = self.datapath.lock();
            for a in s.addresses() {
                stats.add(&dp.remove_session(a));
            }
            dp.forget_rate_state(s.id);
        }
        // Before the address can go to someone else.
        self.record_identity(Op::Remove, &s);
        self.pool.lock().release(s.lease.v4);
        self.ended_spoofed
            .fetch_add(s.spoofed_dropped.load(Ordering::Relaxed), Ordering::Relaxed);
        self.ended_traffic.lock().add(&stats);
        self.account(&s, accounting::Status::Stop, &stats, Some(reason.clone()));
        self.events.emit(Event::ClientDisconnected {
            session_id: s.id,
            user: s.user.clone(),
            vpn_address: s.lease.v4.to_string(),
            reason,
            duration_secs: s.started.elapsed().as_secs(),
            bytes_in: stats.rx_bytes,
            bytes_out: stats.tx_bytes,
        });
        true
    }

    /// Follows the user database: a user removed, or whose password
    /// changed, loses their sessions at once (and their cookies with
    /// them); a changed own policy applies to their sessions. Checks the
    /// file's modification time every second.
    pub async fn watch_users(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let gw = self.clone();
            let Ok(changes) = tokio::task::spawn_blocking(move || gw.users.take_changes()).await
            else {
                continue;
            };
            if changes.is_empty() {
                continue;
            }
            for s in self.table.all() {
                // A session that logged in after the change was read used
                // the new file.
                if s.auth_source != AuthSource::Local
                    || changes.read_at.is_some_and(|t| s.started >= t)
                {
                    continue;
                }
                let reason = if changes.removed.contains(&s.user) {
                    EndReason::UserRemoved
                } else if changes.password_changed.contains(&s.user) {
                    EndReason::PasswordChanged
                } else {
                    continue;
                };
                self.end(s.id, reason);
            }
            if !changes.policy_changed.is_empty() {
                let policies = self.policies.lock();
                let r = self.rebind(&policies);
                drop(policies);
                match r {
                    Ok(orphans) => self.end_orphans(orphans),
                    Err(e) => tracing::error!("applying users' new group policies: {e}"),
                }
            }
        }
    }

    /// Ends sessions past their session timeout, idle timeout, or the time a
    /// session may stay without a tunnel. Runs every second.
    pub async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let limits = self.limits.timeouts;
        loop {
            let now = tick.tick().await.into_std();
            for s in self.table.all() {
                if let Some(reason) = s.expiry(&limits, now) {
                    self.end(s.id, reason);
                }
            }
        }
    }
}

/// What a session is made of, from a login or a saved session.
struct Granted<'a> {
    id: u64,
    user: &'a str,
    group: &'a str,
    binding: PolicyBinding,
    /// Up and down limits, bit/s.
    rates: (u64, u64),
    lease: crate::session::pool::Lease,
    client: IpAddr,
    created: SystemTime,
    started: Instant,
    own_timeouts: OwnTimeouts,
    class: Vec<Vec<u8>>,
    groups: Vec<String>,
    auth_source: AuthSource,
}

fn new_session(g: Granted<'_>) -> Session {
    Session {
        id: g.id,
        user: g.user.to_owned(),
        group: g.group.to_owned(),
        policy: Mutex::new(g.binding),
        rate_up_bps: AtomicU64::new(g.rates.0),
        rate_down_bps: AtomicU64::new(g.rates.1),
        lease: g.lease,
        login_from: g.client,
        mac: pseudo_mac(g.user),
        created: g.created,
        started: g.started,
        last_activity_ms: Default::default(),
        tunnel: Mutex::new(TunnelSlot {
            down_since: Some(Instant::now()),
            ..Default::default()
        }),
        spoofed_dropped: AtomicU64::new(0),
        own_timeouts: g.own_timeouts,
        class: g.class,
        groups: g.groups,
        auth_source: g.auth_source,
        span: crate::session::session_span(g.id, g.user, g.lease.v4),
    }
}

/// Installs a session's BPF entries, its counters starting at `from`;
/// all of them or none.
fn install(
    dp: &mut dyn crate::datapath::DatapathOps,
    s: &Session,
    policy_id: u32,
    from: vpn_common::SessionStats,
) -> Result<(), crate::datapath::bpf::MapWriteError> {
    let info = SessionInfo {
        session_id: s.id,
        policy_id,
        flags: 0,
    };
    for (i, a) in s.addresses().enumerate() {
        let from = if i == 0 { from } else { Default::default() };
        if let Err(e) = dp.add_session_counting_from(a, info, from) {
            for b in s.addresses() {
                dp.remove_session(b);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Writes every `(address, new, old)` with `set`; if one write fails, the
/// writes done are undone with their `old` values (newest first) and the
/// error returned: all of them or none.
fn write_all_or_none<E: std::fmt::Display>(
    writes: &[(IpAddr, SessionInfo, SessionInfo)],
    mut set: impl FnMut(IpAddr, SessionInfo) -> Result<(), E>,
) -> Result<(), E> {
    for (i, (a, new, _)) in writes.iter().enumerate() {
        if let Err(e) = set(*a, *new) {
            for (a, _, old) in writes[..i].iter().rev() {
                if let Err(undo) = set(*a, *old) {
                    tracing::error!(address = %a, "cannot move a session back to its policy: {undo}");
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A reload whose n-th BPF update fails leaves every session as it was.
    #[test]
    fn session_moves_are_all_or_none() {
        let info = |session_id, policy_id| SessionInfo {
            session_id,
            policy_id,
            flags: 0,
        };
        let addr = |i: u8| IpAddr::from([198, 19, 0, i]);
        let writes: Vec<_> = (1..=4u8)
            .map(|i| (addr(i), info(u64::from(i), 7), info(u64::from(i), 3)))
            .collect();
        for fail_at in 0..writes.len() {
            let mut map: HashMap<IpAddr, SessionInfo> =
                writes.iter().map(|(a, _, old)| (*a, *old)).collect();
            let before = map.clone();
            let mut calls = 0;
            let r = write_all_or_none(&writes, |a, i| {
                calls += 1;
                if calls == fail_at + 1 {
                    return Err("map update failed");
                }
                map.insert(a, i);
                Ok(())
            });
            assert_eq!(r, Err("map update failed"));
            assert_eq!(map, before, "failing at write {fail_at}: rolled back");
        }
        let mut map = HashMap::new();
        write_all_or_none(&writes, |a, i| {
            map.insert(a, i);
            Ok::<(), &str>(())
        })
        .unwrap();
        assert!(map.values().all(|i| i.policy_id == 7));
    }
}
