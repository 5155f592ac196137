//! The gateway: shared state, the TLS listener and connection loop, group
//! policy application, and session lifecycle. The login lives in `login.rs`,
//! the tunnel in `tunnel.rs`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use vpn_common::SessionInfo;

use crate::{
    auth::users::UserDb,
    auth::{
        admission::{self, ConnectionRefused, ConnectionSlot, Connections, Verifier},
        login::LoginFlow,
    },
    config::{Config, Settings},
    datapath::bpf::{Datapath, SharedDatapath},
    datapath::tun::Tun,
    events::{Event, EventLog},
    policies::PolicySet,
    proto::http::{self, Response},
    session::pool::Pool,
    session::{Kick, PolicyBinding, SessionTable, Timeouts},
};

/// A client's TLS connection, buffered both ways under TLS:
/// - Output collects in a buffer and reaches the socket on `flush` (or when
///   64 KiB are waiting): every CSTP frame is its own TLS record
///   (openconnect reads one frame per record), and without the buffer every
///   record would be a `write` and a TCP segment of its own. Every write
///   path flushes when it is done.
/// - rustls reads at most 4 KiB per call; the read buffer takes up to
///   64 KiB from the socket per system call instead.
pub type ClientTls = tokio_rustls::server::TlsStream<tokio::io::BufStream<TcpStream>>;

/// Bytes of TLS input read, and of output gathered, per system call.
const TLS_IO_BUFFER: usize = 64 * 1024;

/// Everything the daemon shares between connections.
pub struct Gateway {
    pub settings: Settings,
    pub users: UserDb,
    pub sessions: Arc<SessionTable>,
    pub pool: Mutex<Pool>,
    pub datapath: SharedDatapath,
    pub events: Arc<EventLog>,
    pub tun: Arc<Tun>,
    /// The login flow: logins in progress and failed-login accounting.
    pub(crate) logins: Mutex<LoginFlow>,
    /// Connections that are not tunnels.
    pub(crate) connections: Arc<Connections>,
    /// Password checks.
    pub(crate) verifier: Verifier,
    /// What admission refused (`vpnctl stats`).
    pub(crate) admission: admission::Counters,
    pub started: SystemTime,
    pub policies: Mutex<PolicySet>,
    /// The file `reload` re-reads.
    pub config_path: std::path::PathBuf,
    /// The DTLS server, when `[dtls] enabled`.
    pub dtls: std::sync::OnceLock<Arc<crate::transport::dtls::DtlsServer>>,
    /// The uplinks, when `[[uplink]]`s are configured.
    pub uplinks: std::sync::OnceLock<Arc<crate::net::uplinks::Uplinks>>,
    /// How TLS tunnels' reads were batched.
    pub tls_reads: crate::transport::read_batch::Counters,
    /// Spoofed packets of sessions that have ended (live sessions count
    /// their own).
    pub(crate) ended_spoofed: std::sync::atomic::AtomicU64,
}

impl Gateway {
    /// The gateway with `settings`' policies installed.
    pub fn new(
        settings: Settings,
        config_path: std::path::PathBuf,
        users: UserDb,
        datapath: Datapath,
        events: EventLog,
        tun: Arc<Tun>,
    ) -> anyhow::Result<Arc<Self>> {
        let pool = Pool::new(settings.pool_v4, settings.pool_v6);
        let gw = Arc::new(Gateway {
            users,
            sessions: Arc::default(),
            pool: Mutex::new(pool),
            datapath: Arc::new(Mutex::new(datapath)),
            events: Arc::new(events),
            tun,
            logins: Mutex::new(LoginFlow::new(
                &settings.raw.limits,
                &settings.raw.auth,
                settings.groups.clone(),
            )),
            connections: Connections::new(&settings.raw.limits),
            verifier: Verifier::new(&settings.raw.limits),
            admission: Default::default(),
            started: SystemTime::now(),
            policies: Mutex::new(PolicySet::default()),
            config_path,
            dtls: std::sync::OnceLock::new(),
            uplinks: std::sync::OnceLock::new(),
            tls_reads: Default::default(),
            ended_spoofed: Default::default(),
            settings,
        });
        let settings = gw.settings.clone();
        gw.apply_policies(&settings)?;
        Ok(gw)
    }

    /// Accepts TLS connections until the listener fails.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
    ) -> anyhow::Result<()> {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match self.connections.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(refused) => {
                    let c = &self.admission;
                    match refused {
                        ConnectionRefused::Total => &c.connections_refused_total,
                        ConnectionRefused::Source => &c.connections_refused_source,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "connection refused: {refused:?} limit reached");
                    continue;
                }
            };
            let gw = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Err(e) = gw.handle_connection(tcp, peer, acceptor, slot).await {
                    tracing::debug!(%peer, "connection ended: {e:#}");
                }
            });
        }
    }

    async fn handle_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
        slot: ConnectionSlot,
    ) -> anyhow::Result<()> {
        let _ = tcp.set_nodelay(true);
        let max_requests = self.settings.raw.limits.max_requests_per_connection;
        let lifetime = Duration::from_secs(self.settings.raw.limits.max_connection_secs);
        let opened = tokio::time::Instant::now();
        let timeout = self.settings.request_timeout();
        let tcp = tokio::io::BufStream::with_capacity(TLS_IO_BUFFER, TLS_IO_BUFFER, tcp);
        let mut tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .context("TLS handshake timed out")?
            .context("TLS handshake failed")?;
        // Each CSTP frame must go out as exactly one TLS record: with no
        // buffer limit, rustls takes every write whole and seals it as one
        // record (frames are smaller than the record size limit).
        tls.get_mut().1.set_buffer_limit(None);
        let limits = self.settings.raw.http.clone();
        let keepalive = Duration::from_secs(limits.keepalive_timeout_secs);
        let mut buf = BytesMut::with_capacity(4096);
        let mut requests = 0u32;
        loop {
            let left = lifetime.saturating_sub(opened.elapsed());
            if left.is_zero() {
                self.admission
                    .connections_closed_lifetime
                    .fetch_add(1, Ordering::Relaxed);
                let _ = tls.shutdown().await;
                return Ok(());
            }
            let idle = if requests == 0 { timeout } else { keepalive }.min(left);
            let req = match http::read_request(&mut tls, &mut buf, &limits, idle).await {
                Ok(r) => r,
                Err(e) => {
                    if let Some((code, reason)) = e.status() {
                        tracing::info!(%peer, "bad request: {e}");
                        let _ = Response::text(code, reason, format!("{e}\n"))
                            .closing()
                            .write_to(&mut tls)
                            .await;
                        let _ = tls.shutdown().await;
                    }
                    return Ok(());
                }
            };
            requests += 1;
            if req.method == "CONNECT" {
                return self.connect(tls, buf, req, peer, slot).await;
            }
            let mut resp = self.route(&req, peer).await;
            if requests >= max_requests && !resp.close {
                self.admission
                    .connections_closed_requests
                    .fetch_add(1, Ordering::Relaxed);
                resp = resp.closing();
            }
            resp.write_to(&mut tls).await?;
            if resp.close || req.wants_close() {
                let _ = tls.shutdown().await;
                return Ok(());
            }
        }
    }

    /// The admission limits' state and counters.
    pub fn admission_stats(&self) -> admission::AdmissionStats {
        let l = &self.settings.raw.limits;
        let c = &self.admission;
        let (pending, sources_locked, users_locked) =
            self.logins.lock().counts(std::time::Instant::now());
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        admission::AdmissionStats {
            connections: self.connections.open(),
            max_connections: l.max_connections,
            max_connections_per_source: l.max_connections_per_source,
            connections_refused_total: n(&c.connections_refused_total),
            connections_refused_source: n(&c.connections_refused_source),
            connections_closed_requests: n(&c.connections_closed_requests),
            connections_closed_lifetime: n(&c.connections_closed_lifetime),
            pending_logins: pending,
            max_pending_logins: l.max_pending_logins,
            logins_refused_busy: n(&c.logins_refused_busy),
            logins_refused_source_busy: n(&c.logins_refused_source_busy),
            logins_refused_source_locked: n(&c.logins_refused_source_locked),
            logins_refused_user_locked: n(&c.logins_refused_user_locked),
            sources_locked,
            users_locked,
            verifications_refused_busy: n(&c.verifications_refused_busy),
            verifications_in_progress: self.verifier.in_progress(),
        }
    }

    /// Installs the policies of `settings` (at start and on reload): all
    /// or nothing. If a session cannot be moved to its new policy, the
    /// sessions already moved go back and the new versions are removed,
    /// so "rejected, the running configuration stays" is true.
    pub fn apply_policies(&self, settings: &Settings) -> anyhow::Result<()> {
        let mut policies = self.policies.lock();
        let applied = policies.apply(
            &mut self.datapath.lock(),
            &settings.policies,
            settings.raw.policy.default.clone(),
            // The split list clients were given at connect time.
            &self.settings.split_allow,
            settings.raw.policy.max_entries,
        )?;
        // Re-resolve every session against the new set (users may have
        // new policies too), then drop the versions nobody uses.
        match self.rebind_sessions(&policies) {
            Ok(orphans) => {
                policies.retire(&mut self.datapath.lock(), applied.old);
                drop(policies);
                self.end_orphans(orphans);
                Ok(())
            }
            Err(e) => {
                policies.rollback(&mut self.datapath.lock(), applied);
                Err(e)
            }
        }
    }

    /// Ends the sessions [`Self::rebind_sessions`] found without a policy
    /// (fail closed: never leave a session on a policy that is gone, nor
    /// silently widen its access). Called without the policy lock, which
    /// `end_session`'s locks must not nest in.
    fn end_orphans(&self, orphans: Vec<(u64, String)>) {
        for (id, why) in orphans {
            self.end_session(id, &why);
        }
    }

    /// Re-resolves every session's policy (users' own policies re-read,
    /// schedules evaluated now) and moves the sessions whose policy
    /// changed, all or none: if one BPF update fails, those done are
    /// undone and the error returned. Returns the sessions whose policy no
    /// longer exists, for [`Self::end_orphans`].
    fn rebind_sessions(&self, policies: &PolicySet) -> anyhow::Result<Vec<(u64, String)>> {
        let mut moves = Vec::new();
        let mut writes = Vec::new();
        let mut orphans = Vec::new();
        for s in self.sessions.all() {
            let own = match self.users.policy_of(&s.user) {
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
                Err(e) => orphans.push((s.id, format!("{e} any more"))),
            }
        }
        {
            let mut dp = self.datapath.lock();
            write_all_or_none(&writes, |a, info| dp.set_session(a, info))?;
        }
        for (s, binding, (up, down)) in moves {
            s.rate_up_bps.store(up, Ordering::Relaxed);
            s.rate_down_bps.store(down, Ordering::Relaxed);
            let mut current = s.policy.lock();
            if *current != binding {
                tracing::info!(user = s.user, policy = ?binding.effective, "session policy changed");
                *current = binding;
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
                let r = self.rebind_sessions(&policies);
                drop(policies);
                match r {
                    Ok(orphans) => self.end_orphans(orphans),
                    Err(e) => tracing::error!("applying policy schedules: {e:#}"),
                }
            }
        }
    }

    /// `vpnctl reload` / SIGHUP: re-reads the config file. A file that does
    /// not validate is rejected and the running config stays. Group
    /// policies and the default policy change live; other sections need a
    /// restart and are reported as such.
    pub fn reload(&self) -> Result<String, String> {
        let new = Config::load(&self.config_path).map_err(|e| {
            let msg = format!("reload rejected, the running configuration stays: {e}");
            self.events.emit(Event::ConfigReloadFailed {
                reason: e.to_string(),
            });
            msg
        })?;
        self.apply_policies(&new).map_err(|e| {
            let msg = format!("reload rejected, the running configuration stays: {e:#}");
            self.events.emit(Event::ConfigReloadFailed {
                reason: format!("{e:#}"),
            });
            msg
        })?;
        let mut restart = Vec::new();
        let (a, b) = (&self.settings.raw, &new.raw);
        for (name, same) in [
            ("server", a.server == b.server),
            ("tls", a.tls == b.tls),
            ("http", a.http == b.http),
            ("tunnel", a.tunnel == b.tunnel),
            ("client_routing", a.client_routing == b.client_routing),
            ("session", a.session == b.session),
            ("auth", a.auth == b.auth),
            ("group", a.groups == b.groups),
            ("dtls", a.dtls == b.dtls),
            ("uplink", a.uplinks == b.uplinks),
            ("failover", a.failover == b.failover),
        ] {
            if !same {
                restart.push(name);
            }
        }
        let n = new.policies.len();
        self.events.emit(Event::ConfigReloaded {
            policies: n,
            needs_restart: restart.iter().map(|s| s.to_string()).collect(),
        });
        Ok(if restart.is_empty() {
            format!("reloaded: {n} group policies applied")
        } else {
            format!(
                "reloaded: {n} group policies applied; changes to [{}] take effect after a restart",
                restart.join("], [")
            )
        })
    }

    /// Ends a session for good: closes its tunnel (telling the client),
    /// frees its address and BPF entries and logs the event. Idempotent.
    pub fn end_session(&self, id: u64, reason: &str) -> bool {
        let Some(s) = self.sessions.remove(id) else {
            return false;
        };
        tracing::debug!(session = id, "ending session: {reason}");
        if let Some(h) = s.tunnel.lock().handle.take()
            && let Some(k) = h.kick
        {
            let _ = k.send(Kick::Terminate(reason.to_owned()));
        }
        if let Some(d) = self.dtls.get() {
            d.close_session(s.id);
        }
        let mut stats = vpn_common::SessionStats::default();
        {
            let mut dp = self.datapath.lock();
            for a in s.addresses() {
                stats.add(&dp.remove_session(a));
            }
            dp.forget_rate_state(s.id);
        }
        self.pool.lock().release(s.lease.v4);
        self.ended_spoofed
            .fetch_add(s.spoofed_dropped.load(Ordering::Relaxed), Ordering::Relaxed);
        self.events.emit(Event::ClientDisconnected {
            session_id: s.id,
            user: s.user.clone(),
            vpn_address: s.lease.v4.to_string(),
            reason: reason.to_owned(),
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
            for s in self.sessions.all() {
                let reason = if changes.removed.contains(&s.user) {
                    "user removed from the user database"
                } else if changes.password_changed.contains(&s.user) {
                    "password changed"
                } else {
                    continue;
                };
                self.end_session(s.id, reason);
            }
            if !changes.policy_changed.is_empty() {
                let policies = self.policies.lock();
                let r = self.rebind_sessions(&policies);
                drop(policies);
                match r {
                    Ok(orphans) => self.end_orphans(orphans),
                    Err(e) => tracing::error!("applying users' new group policies: {e:#}"),
                }
            }
        }
    }

    /// Ends sessions past their session timeout, idle timeout, or the time a
    /// session may stay without a tunnel. Runs every second.
    pub async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let cfg = &self.settings.raw.session;
        let limits = Timeouts {
            session: self.settings.tunnel.session_timeout,
            idle: Duration::from_secs(cfg.idle_timeout_secs),
            disconnected: Duration::from_secs(cfg.disconnected_timeout_secs),
        };
        loop {
            let now = tick.tick().await.into_std();
            for s in self.sessions.all() {
                if let Some(reason) = s.expiry(&limits, now) {
                    self.end_session(s.id, reason);
                }
            }
        }
    }
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

/// The listener and TLS acceptor for the configured address.
pub async fn bind(
    settings: &Settings,
    tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<(TcpListener, TlsAcceptor)> {
    let addr = settings.raw.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (server.listen)"))?;
    Ok((listener, TlsAcceptor::from(tls)))
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
