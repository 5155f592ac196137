//! The gateway: TLS listener, the HTTP/XML login, the CONNECT that turns a
//! TLS connection into a CSTP tunnel, and session lifecycle.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use bytes::BytesMut;
use rand::RngCore as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use vpn_common::SessionInfo;

use crate::{
    bpf::Datapath,
    config::{Config, Routing, Settings},
    cstp::{self, FrameType},
    events::{Event, EventLog},
    http::{self, Request, Response},
    mac::{format_mac, pseudo_mac},
    policies::PolicySet,
    pool::Pool,
    session::{
        Kick, Pacer, PolicyBinding, Session, SessionTable, Timeouts, TunnelHandle, TunnelSlot,
        new_cookie,
    },
    tun::Tun,
    users::{AuthResult, UserDb},
    xml,
};

/// Logins in progress (between the first form and success) at most.
const MAX_PENDING_LOGINS: usize = 4096;

/// Packets queued towards one client before new ones are dropped.
const CLIENT_QUEUE: usize = 512;

/// A login in progress, between the first form and success.
struct AuthState {
    group: String,
    failures: u32,
    started: Instant,
}

/// Everything the daemon shares between connections.
pub struct Gateway {
    pub settings: Settings,
    pub users: UserDb,
    pub sessions: SessionTable,
    pub pool: Mutex<Pool>,
    pub datapath: Mutex<Datapath>,
    pub events: EventLog,
    pub tun: Arc<Tun>,
    auth: Mutex<HashMap<String, AuthState>>,
    pub started: SystemTime,
    pub policies: Mutex<PolicySet>,
    /// The file `reload` re-reads.
    pub config_path: std::path::PathBuf,
    /// The DTLS server, when `[dtls] enabled`.
    pub dtls: std::sync::OnceLock<Arc<crate::dtls::DtlsServer>>,
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
            settings,
            users,
            sessions: SessionTable::default(),
            pool: Mutex::new(pool),
            datapath: Mutex::new(datapath),
            events,
            tun,
            auth: Mutex::new(HashMap::new()),
            started: SystemTime::now(),
            policies: Mutex::new(PolicySet::default()),
            config_path,
            dtls: std::sync::OnceLock::new(),
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
            let gw = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Err(e) = gw.handle_connection(tcp, peer, acceptor).await {
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
    ) -> anyhow::Result<()> {
        let _ = tcp.set_nodelay(true);
        let timeout = self.settings.request_timeout();
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
        let mut first = true;
        loop {
            let idle = if first { timeout } else { keepalive };
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
            first = false;
            if req.method == "CONNECT" {
                return self.connect(tls, buf, req, peer).await;
            }
            let resp = self.route(&req, peer).await;
            resp.write_to(&mut tls).await?;
            if resp.close || req.wants_close() {
                let _ = tls.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Answers a request of the authentication phase.
    async fn route(self: &Arc<Self>, req: &Request, peer: SocketAddr) -> Response {
        match req.method.as_str() {
            "POST" => self.post(req, peer).await,
            "GET" => match req.path.as_str() {
                "/" => Response::new(200, "OK")
                    .header("Content-Type", "text/html; charset=utf-8")
                    .with_body(
                        "<html><body><p>vpn-gateway: connect with an AnyConnect-compatible client (Cisco Secure Client, openconnect).</p></body></html>\n",
                    ),
                // Cisco clients probe their downloader; answer as ocserv does
                // so they do not try to "upgrade".
                "/1/VPNManifest.xml" => Response::xml("<vpn rev=\"1.0\"></vpn>\n".into()),
                "/1/binaries/update.txt" => Response::text(200, "OK", "0,0,0000\n"),
                "/logout" => Response::text(200, "OK", ""),
                p if p.starts_with("/+CSCOT+/") => Response::xml("<vpn rev=\"1.0\"></vpn>\n".into()),
                _ => Response::text(404, "Not Found", "not found\n"),
            },
            m => Response::text(405, "Method Not Allowed", format!("method {m} is not supported\n"))
                .header("Allow", "GET, POST, CONNECT"),
        }
    }

    async fn post(self: &Arc<Self>, req: &Request, peer: SocketAddr) -> Response {
        let body = match std::str::from_utf8(&req.body) {
            Ok(b) => b,
            Err(_) => {
                return Response::text(400, "Bad Request", "the request body is not UTF-8 XML\n");
            }
        };
        let msg = match xml::parse_client_auth(body) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(%peer, "rejected auth request: {e}");
                return Response::text(400, "Bad Request", format!("{e}\n"));
            }
        };
        match msg.kind.as_str() {
            "init" => {
                // The path selects the group on the first request (group URL),
                // an explicit <group-select> overrides it.
                let from_path = req.path.trim_start_matches('/');
                let wanted = msg.group_select.as_deref().unwrap_or(from_path);
                let group = self
                    .settings
                    .find_group(wanted)
                    .unwrap_or(&self.settings.groups[0])
                    .name
                    .clone();
                match self.start_login(group.clone()) {
                    Some(handle) => self.form(&handle, &group, None),
                    None => Self::busy(),
                }
            }
            "auth-reply" => self.auth_reply(req, msg, peer).await,
            "logout" => {
                if let Some(s) = msg
                    .session_token
                    .as_deref()
                    .and_then(|t| self.sessions.by_cookie(t))
                {
                    self.end_session(s.id, "user logout");
                }
                Response::xml(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<config-auth client=\"vpn\" type=\"complete\" aggregate-auth-version=\"2\"><logout>ok</logout></config-auth>\n".into(),
                )
            }
            other => Response::text(
                400,
                "Bad Request",
                format!(
                    "config-auth type '{other}' is not supported: expected init, auth-reply or logout\n"
                ),
            ),
        }
    }

    /// Starts a login and returns its handle, or `None` when too many logins
    /// are in progress (a flood of `init` requests must not grow memory).
    fn start_login(&self, group: String) -> Option<String> {
        let mut h = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut h);
        let handle = hex::encode(h);
        let ttl = Duration::from_secs(self.settings.raw.auth.timeout_secs);
        let mut auth = self.auth.lock().unwrap();
        auth.retain(|_, s| s.started.elapsed() < ttl);
        if auth.len() >= MAX_PENDING_LOGINS {
            return None;
        }
        auth.insert(
            handle.clone(),
            AuthState {
                group,
                failures: 0,
                started: Instant::now(),
            },
        );
        Some(handle)
    }

    fn busy() -> Response {
        Response::text(
            503,
            "Service Unavailable",
            "too many logins in progress; try again shortly\n",
        )
        .closing()
    }

    fn form(&self, handle: &str, group: &str, error: Option<&str>) -> Response {
        let groups: Vec<xml::GroupOption<'_>> = self
            .settings
            .groups
            .iter()
            .map(|g| xml::GroupOption {
                name: &g.name,
                label: g.label.as_deref().unwrap_or(&g.name),
            })
            .collect();
        let body = xml::login_form(&xml::LoginForm {
            handle,
            title: &self.settings.raw.server.name,
            message: "Please enter your username and password.",
            error,
            groups: &groups,
            selected_group: group,
        });
        Response::xml(body).header(
            "Set-Cookie",
            format!(
                "webvpncontext={handle}; Max-Age={}; Secure; HttpOnly",
                self.settings.raw.auth.timeout_secs
            ),
        )
    }

    async fn auth_reply(
        self: &Arc<Self>,
        req: &Request,
        msg: xml::ClientAuth,
        peer: SocketAddr,
    ) -> Response {
        let handle = msg
            .handle
            .clone()
            .or_else(|| req.cookie("webvpncontext").map(str::to_owned));
        let ttl = Duration::from_secs(self.settings.raw.auth.timeout_secs);
        let state_group = handle.as_ref().and_then(|h| {
            let auth = self.auth.lock().unwrap();
            auth.get(h)
                .filter(|s| s.started.elapsed() < ttl)
                .map(|s| s.group.clone())
        });
        let (handle, group) = match (handle, state_group) {
            (Some(h), Some(g)) => (h, g),
            _ => {
                let group = self.settings.groups[0].name.clone();
                return match self.start_login(group.clone()) {
                    Some(h) => self.form(
                        &h,
                        &group,
                        Some("your login attempt expired; please log in again"),
                    ),
                    None => Self::busy(),
                };
            }
        };
        let group = match msg.group_select.as_deref() {
            None => group,
            Some(g) => match self.settings.find_group(g) {
                Some(g) => g.name.clone(),
                None => return self.form(&handle, &group, Some(&format!("unknown group '{g}'"))),
            },
        };
        let (Some(user), Some(password)) = (msg.username, msg.password) else {
            return self.form(&handle, &group, Some("enter a username and a password"));
        };
        let gw = self.clone();
        let (u, p) = (user.clone(), password);
        let result = tokio::task::spawn_blocking(move || gw.users.authenticate(&u, &p))
            .await
            .unwrap_or(AuthResult::UnknownUser);
        let group_policy = match result {
            AuthResult::Ok { group_policy } => group_policy,
            bad => {
                let reason = if bad == AuthResult::UnknownUser {
                    "unknown user"
                } else {
                    "wrong password"
                };
                self.events.emit(Event::AuthenticationFailed {
                    user: user.clone(),
                    source_address: peer.to_string(),
                    reason: reason.into(),
                });
                let failures = {
                    let mut auth = self.auth.lock().unwrap();
                    let s = auth.get_mut(&handle).expect("state checked above");
                    s.failures += 1;
                    s.failures
                };
                if failures >= self.settings.raw.auth.max_failures {
                    self.auth.lock().unwrap().remove(&handle);
                    return Response::text(
                        401,
                        "Authentication failed",
                        "too many failed attempts\n",
                    )
                    .closing();
                }
                return self.form(&handle, &group, Some("invalid username or password"));
            }
        };
        self.auth.lock().unwrap().remove(&handle);
        match self.create_session(&user, &group, group_policy) {
            Ok((session, cookie)) => {
                tracing::info!(user, session = session.id, "login succeeded");
                Response::xml(xml::complete(
                    session.id,
                    &cookie,
                    self.settings.raw.tunnel.banner.as_deref(),
                ))
                .header("Set-Cookie", format!("webvpn={cookie}; Secure; HttpOnly"))
                .header(
                    "Set-Cookie",
                    "webvpncontext=; Max-Age=0; Secure; HttpOnly".to_string(),
                )
            }
            Err(reason) => {
                self.events.emit(Event::LoginRefused {
                    user,
                    source_address: peer.to_string(),
                    reason: reason.clone(),
                });
                Response::xml(xml::fatal_error(&self.settings.raw.server.name, &reason))
            }
        }
    }

    /// Creates a session for an authenticated user, or says why not.
    fn create_session(
        &self,
        user: &str,
        group: &str,
        group_policy: Option<String>,
    ) -> Result<(Arc<Session>, String), String> {
        let max = self.settings.raw.server.max_sessions as usize;
        // The pool lock also serialises the limit check with the insert.
        // Lock order: pool, policies, datapath.
        let mut pool = self.pool.lock().unwrap();
        let policies = self.policies.lock().unwrap();
        let (binding, (up_rate, down_rate)) = match policies.resolve(group_policy.as_deref()) {
            Ok(p) => (
                PolicyBinding {
                    own: group_policy,
                    effective: p.as_ref().map(|p| p.def.name.clone()),
                    id: p.as_ref().map_or(0, |p| p.id),
                },
                p.map_or((0, 0), |p| {
                    (p.def.info.rate_up_bps, p.def.info.rate_down_bps)
                }),
            ),
            Err(e) => {
                return Err(format!(
                    "{e}; the login is refused (ask your administrator to fix your account)"
                ));
            }
        };
        if self.sessions.len() >= max {
            return Err(format!(
                "the gateway has reached its limit of {max} concurrent sessions; try again later"
            ));
        }
        let lease = pool
            .allocate(user)
            .ok_or_else(|| "no free address in the VPN pool; try again later".to_string())?;
        let now = Instant::now();
        let session = Arc::new(Session {
            id: self.sessions.next_id(),
            user: user.to_owned(),
            group: group.to_owned(),
            policy: Mutex::new(binding.clone()),
            rate_up_bps: AtomicU64::new(up_rate),
            rate_down_bps: AtomicU64::new(down_rate),
            lease,
            mac: pseudo_mac(user),
            created: SystemTime::now(),
            started: now,
            last_activity_ms: Default::default(),
            tunnel: Mutex::new(TunnelSlot {
                down_since: Some(now),
                ..Default::default()
            }),
        });
        {
            let mut dp = self.datapath.lock().unwrap();
            let info = SessionInfo {
                session_id: session.id,
                policy_id: binding.id,
                flags: 0,
            };
            for a in session.addresses() {
                if let Err(e) = dp.add_session(a, info) {
                    for b in session.addresses() {
                        dp.remove_session(b);
                    }
                    pool.release(lease.v4);
                    tracing::error!("cannot install session in BPF maps: {e:#}");
                    return Err("the gateway could not set up the session; try again later".into());
                }
            }
        }
        drop(policies);
        let cookie = new_cookie();
        self.sessions.insert(session.clone(), &cookie);
        Ok((session, cookie))
    }

    /// Installs the policies of `settings` (at start and on reload).
    pub fn apply_policies(&self, settings: &Settings) -> anyhow::Result<()> {
        let mut policies = self.policies.lock().unwrap();
        let mut dp = self.datapath.lock().unwrap();
        let old = policies.apply(
            &mut dp,
            &settings.policies,
            settings.raw.policy.default.clone(),
            // The split list clients were given at connect time.
            &self.settings.split_allow,
            settings.raw.policy.max_entries,
        )?;
        drop(dp);
        // Re-resolve every session against the new set (users may have
        // new policies too), then drop the versions nobody uses.
        let mut policies = self.rebind_sessions(policies)?;
        let mut dp = self.datapath.lock().unwrap();
        policies.retire(&mut dp, old);
        Ok(())
    }

    /// Re-resolves every session's policy (users' own policies re-read,
    /// schedules evaluated now) and flips the sessions whose policy changed;
    /// a session whose policy no longer exists ends (fail closed).
    fn rebind_sessions<'a>(
        &'a self,
        mut policies: std::sync::MutexGuard<'a, PolicySet>,
    ) -> anyhow::Result<std::sync::MutexGuard<'a, PolicySet>> {
        for s in self.sessions.all() {
            let own = match self.users.policy_of(&s.user) {
                Some(own) => own,
                None => s.policy.lock().unwrap().own.clone(),
            };
            match policies.resolve(own.as_deref()) {
                Ok(p) => {
                    let (up, down) = p.as_ref().map_or((0, 0), |p| {
                        (p.def.info.rate_up_bps, p.def.info.rate_down_bps)
                    });
                    s.rate_up_bps.store(up, Ordering::Relaxed);
                    s.rate_down_bps.store(down, Ordering::Relaxed);
                    let binding = PolicyBinding {
                        own,
                        effective: p.as_ref().map(|p| p.def.name.clone()),
                        id: p.map_or(0, |p| p.id),
                    };
                    if *s.policy.lock().unwrap() != binding {
                        let mut dp = self.datapath.lock().unwrap();
                        for a in s.addresses() {
                            dp.set_session(
                                a,
                                SessionInfo {
                                    session_id: s.id,
                                    policy_id: binding.id,
                                    flags: 0,
                                },
                            )?;
                        }
                        tracing::info!(user = s.user, policy = ?binding.effective, "session policy changed");
                        *s.policy.lock().unwrap() = binding;
                    }
                }
                Err(e) => {
                    // Fail closed: never leave a session on a policy that
                    // is gone, nor silently widen its access.
                    drop(policies);
                    self.end_session(s.id, &format!("{e} any more"));
                    policies = self.policies.lock().unwrap();
                }
            }
        }
        Ok(policies)
    }

    /// Switches sessions between scheduled policies and their fallbacks
    /// when a schedule window opens or closes (checked every 15 s).
    pub async fn follow_schedules(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        let mut last = Vec::new();
        loop {
            tick.tick().await;
            let now = crate::policy::local_now();
            let policies = self.policies.lock().unwrap();
            let state = policies.schedule_state(now);
            if state != last {
                last = state;
                if let Err(e) = self.rebind_sessions(policies) {
                    tracing::error!("applying policy schedules: {e:#}");
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
        if let Some(h) = s.tunnel.lock().unwrap().handle.take()
            && let Some(k) = h.kick
        {
            let _ = k.send(Kick::Terminate(reason.to_owned()));
        }
        let mut stats = vpn_common::SessionStats::default();
        {
            let mut dp = self.datapath.lock().unwrap();
            for a in s.addresses() {
                stats.add(&dp.remove_session(a));
            }
            dp.forget_rate_state(s.id);
        }
        self.pool.lock().unwrap().release(s.lease.v4);
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

    /// Ends sessions past their session timeout, idle timeout, or the time a
    /// session may stay without a tunnel. Runs every second.
    pub async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let cfg = &self.settings.raw.session;
        let limits = Timeouts {
            session: self.settings.session_timeout,
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

    /// Reads packets routed to the tunnel device and hands each to the
    /// session owning its destination address.
    pub async fn tun_reader(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!("reading {}: {e}", self.tun.name());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let pkt = &buf[..n];
            let Some(dst) = packet_dst(pkt) else { continue };
            if let Some(s) = self.sessions.by_addr(&dst) {
                s.touch();
                s.deliver(pkt.to_vec());
            }
        }
    }

    /// `CONNECT /CSCOSSLC/tunnel`: validates the cookie, attaches a tunnel
    /// to the session (taking it over from an older one) and runs it.
    async fn connect(
        self: Arc<Self>,
        mut tls: TlsStream<TcpStream>,
        leftover: BytesMut,
        req: Request,
        peer: SocketAddr,
    ) -> anyhow::Result<()> {
        if req.path != "/CSCOSSLC/tunnel" {
            Response::text(404, "Not Found", "the tunnel path is /CSCOSSLC/tunnel\n")
                .closing()
                .write_to(&mut tls)
                .await?;
            return Ok(());
        }
        let Some(session) = req
            .cookie("webvpn")
            .and_then(|c| self.sessions.by_cookie(c))
        else {
            tracing::info!(%peer, "CONNECT with an unknown or expired cookie");
            Response::text(
                401,
                "Cookie is not valid",
                "unknown or expired session cookie\n",
            )
            .closing()
            .write_to(&mut tls)
            .await?;
            let _ = tls.shutdown().await;
            return Ok(());
        };

        let (to_client, from_gw) = mpsc::channel(CLIENT_QUEUE);
        let (kick_tx, kick_rx) = oneshot::channel();
        let (generation, resumed) = {
            let mut slot = session.tunnel.lock().unwrap();
            let resumed = slot.generation > 0;
            if let Some(old) = slot.handle.take()
                && let Some(k) = old.kick
            {
                let _ = k.send(Kick::Replaced);
            }
            slot.generation += 1;
            slot.peer = Some(peer);
            slot.down_since = None;
            slot.handle = Some(TunnelHandle {
                generation: slot.generation,
                to_client,
                kick: Some(kick_tx),
            });
            (slot.generation, resumed)
        };
        session.touch();

        let dtls_offer = self
            .dtls
            .get()
            .and_then(|d| self.dtls_offer(d, &req, &tls, &session));
        let head = self.connect_response(&req, &session, dtls_offer.as_ref().map(|(_, a)| a));
        tls.write_all(head.as_bytes()).await?;
        tls.flush().await?;
        self.events.emit(Event::ClientConnected {
            session_id: session.id,
            user: session.user.clone(),
            group: session.group.clone(),
            vpn_address: session.lease.v4.to_string(),
            public_address: peer.to_string(),
            pseudo_mac: format_mac(&session.mac),
            resumed,
        });

        let end = self
            .run_tunnel(tls, leftover, &session, from_gw, kick_rx)
            .await;
        // The DTLS offer belongs to this TLS connection (its PSK does).
        if let Some((d, answer)) = &dtls_offer {
            d.withdraw(answer.id());
        }
        match end {
            TunnelEnd::Logout => {
                self.end_session(session.id, "user logout");
            }
            TunnelEnd::Kicked => {}
            TunnelEnd::Down(reason) => {
                let mut slot = session.tunnel.lock().unwrap();
                if slot.generation == generation {
                    slot.handle = None;
                    slot.down_since = Some(Instant::now());
                    drop(slot);
                    self.events.emit(Event::TunnelDown {
                        session_id: session.id,
                        user: session.user.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// The CONNECT response head: everything the client needs to configure
    /// its side. Header names are written in the exact case openconnect
    /// matches.
    /// Chooses the DTLS mode for this tunnel (PSK-NEGOTIATE when the client
    /// offers it, else Cisco session resumption with the strongest
    /// X-DTLS12 suite both know) and registers the offer.
    fn dtls_offer(
        &self,
        d: &Arc<crate::dtls::DtlsServer>,
        req: &Request,
        tls: &TlsStream<TcpStream>,
        session: &Arc<Session>,
    ) -> Option<(Arc<crate::dtls::DtlsServer>, DtlsAnswer)> {
        if offers_psk_negotiate(req) && self.settings.raw.dtls.psk_negotiate {
            let mut psk = [0u8; 32];
            // The PSK: this TLS connection's exporter.
            if let Err(e) =
                tls.get_ref()
                    .1
                    .export_keying_material(&mut psk, crate::dtls::PSK_LABEL, None)
            {
                tracing::warn!("no DTLS for this tunnel: exporter failed: {e}");
                return None;
            }
            let app_id = d.offer(session.clone(), psk);
            return Some((
                d.clone(),
                DtlsAnswer::Psk {
                    port: d.port(),
                    app_id,
                },
            ));
        }
        let master: [u8; 48] = hex::decode(req.header("X-DTLS-Master-Secret")?)
            .ok()?
            .try_into()
            .ok()?;
        let (name, suite) = crate::dtls::pick_dtls12_suite(req.header("X-DTLS12-CipherSuite")?)?;
        match d.offer_resumption(session.clone(), &master, suite) {
            Ok(sid) => Some((
                d.clone(),
                DtlsAnswer::Resume {
                    port: d.port(),
                    sid,
                    suite: name,
                },
            )),
            Err(e) => {
                tracing::warn!("no DTLS for this tunnel: {e:#}");
                None
            }
        }
    }

    fn connect_response(&self, req: &Request, s: &Session, dtls: Option<&DtlsAnswer>) -> String {
        let st = &self.settings;
        let cfg = &st.raw;
        let mut h: Vec<(&str, String)> = Vec::with_capacity(32);
        h.push(("X-CSTP-Version", "1".into()));
        h.push((
            "X-CSTP-Server-Name",
            format!("vpn-gateway {}", env!("CARGO_PKG_VERSION")),
        ));
        h.push(("X-CSTP-Address", s.lease.v4.to_string()));
        h.push(("X-CSTP-Netmask", st.pool_v4.netmask().to_string()));
        let wants_v6 = req
            .header("X-CSTP-Address-Type")
            .is_none_or(|t| t.split(',').any(|f| f.trim().eq_ignore_ascii_case("IPv6")));
        let full_v6 = req
            .header("X-CSTP-Full-IPv6-Capability")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let v6 = match (s.lease.v6, st.pool_v6) {
            (Some(a), Some(net)) if wants_v6 && full_v6 => {
                h.push(("X-CSTP-Address-IP6", format!("{a}/{}", net.prefix_len())));
                true
            }
            _ => false,
        };
        for d in &cfg.tunnel.dns {
            if d.is_ipv4() || v6 {
                h.push(("X-CSTP-DNS", d.to_string()));
            }
        }
        if let Some(d) = &cfg.tunnel.default_domain {
            h.push(("X-CSTP-Default-Domain", d.clone()));
        }
        if cfg.client_routing.local_lan_access {
            // Cisco's "local LAN access" flag; it must come first.
            h.push(("X-CSTP-Split-Exclude", "0.0.0.0/255.255.255.255".into()));
        }
        let (name, nets) = match &st.routing {
            Routing::All => ("", &[][..]),
            Routing::Include(n) => ("Include", &n[..]),
            Routing::Exclude(n) => ("Exclude", &n[..]),
        };
        for n in nets {
            match n {
                ipnet::IpNet::V4(n) => h.push((
                    if name == "Include" {
                        "X-CSTP-Split-Include"
                    } else {
                        "X-CSTP-Split-Exclude"
                    },
                    format!("{}/{}", n.network(), n.netmask()),
                )),
                ipnet::IpNet::V6(n) if v6 => h.push((
                    if name == "Include" {
                        "X-CSTP-Split-Include-IP6"
                    } else {
                        "X-CSTP-Split-Exclude-IP6"
                    },
                    n.to_string(),
                )),
                ipnet::IpNet::V6(_) => {}
            }
        }
        h.push((
            "X-CSTP-Tunnel-All-DNS",
            matches!(st.routing, Routing::All).to_string(),
        ));
        if let Some(b) = &cfg.tunnel.banner {
            h.push(("X-CSTP-Banner", percent_encode_banner(b)));
        }
        let session_secs = st.session_timeout.as_secs();
        let remaining = st
            .session_timeout
            .saturating_sub(s.started.elapsed())
            .as_secs();
        h.push(("X-CSTP-Session-Timeout", session_secs.to_string()));
        h.push(("X-CSTP-Session-Timeout-Remaining", remaining.to_string()));
        h.push(("X-CSTP-Lease-Duration", session_secs.to_string()));
        h.push((
            "X-CSTP-Idle-Timeout",
            match cfg.session.idle_timeout_secs {
                0 => "none".into(),
                n => n.to_string(),
            },
        ));
        h.push((
            "X-CSTP-Disconnected-Timeout",
            cfg.session.disconnected_timeout_secs.to_string(),
        ));
        h.push(("X-CSTP-DPD", cfg.session.dpd_secs.to_string()));
        h.push(("X-CSTP-Keepalive", cfg.session.keepalive_secs.to_string()));
        // rustls cannot renegotiate: ask for a fresh tunnel instead (never).
        h.push(("X-CSTP-Rekey-Method", "none".into()));
        let client_mtu: Option<u16> = req.header("X-CSTP-MTU").and_then(|v| v.parse().ok());
        let mut mtu = client_mtu.map_or(cfg.tunnel.mtu, |c| c.clamp(576, cfg.tunnel.mtu));
        let base = req
            .header("X-CSTP-Base-MTU")
            .and_then(|v| v.parse::<u16>().ok());
        if let Some(base) = base {
            h.push(("X-CSTP-Base-MTU", base.to_string()));
            if dtls.is_some() {
                // Full-size packets must fit one datagram: outer IP + UDP +
                // the DTLS record overhead of the GCM suites we use.
                mtu = mtu.min(
                    base.saturating_sub(20 + 8 + crate::dtls::DTLS_GCM_OVERHEAD)
                        .max(576),
                );
            }
        }
        h.push(("X-CSTP-MTU", mtu.to_string()));
        h.push(("X-CSTP-Keep", "true".into()));
        h.push(("X-CSTP-TCP-Keepalive", "true".into()));
        h.push(("X-CSTP-License", "accept".into()));
        h.push(("X-CSTP-Client-Bypass-Protocol", "false".into()));
        if let Some(answer) = dtls {
            match answer {
                DtlsAnswer::Psk { port, app_id } => {
                    h.push(("X-DTLS-Port", port.to_string()));
                    h.push(("X-DTLS-App-ID", hex::encode(app_id)));
                    h.push(("X-DTLS-CipherSuite", "PSK-NEGOTIATE".into()));
                }
                DtlsAnswer::Resume { port, sid, suite } => {
                    h.push(("X-DTLS-Port", port.to_string()));
                    h.push(("X-DTLS-Session-ID", hex::encode_upper(sid)));
                    h.push(("X-DTLS12-CipherSuite", suite.to_string()));
                    h.push(("X-DTLS-MTU", mtu.to_string()));
                }
            }
            h.push(("X-DTLS-DPD", cfg.session.dpd_secs.to_string()));
            h.push(("X-DTLS-Keepalive", cfg.session.keepalive_secs.to_string()));
            h.push(("X-DTLS-Rekey-Method", "none".into()));
        }

        let mut out = String::from("HTTP/1.1 200 CONNECTED\r\n");
        for (n, v) in h {
            out.push_str(n);
            out.push_str(": ");
            out.push_str(&v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out
    }

    /// Moves packets between the TLS stream and the tunnel device until the
    /// client leaves, dies, or the server kicks it.
    async fn run_tunnel(
        &self,
        tls: TlsStream<TcpStream>,
        mut inbuf: BytesMut,
        session: &Arc<Session>,
        mut from_gw: mpsc::Receiver<Vec<u8>>,
        mut kick: oneshot::Receiver<Kick>,
    ) -> TunnelEnd {
        let (mut rd, mut wr) = tokio::io::split(tls);
        let dpd = Duration::from_secs(self.settings.raw.session.dpd_secs);
        let mut last_rx = Instant::now();
        let mut last_dpd_sent = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut out = Vec::with_capacity(cstp::MAX_PAYLOAD + cstp::HEADER_LEN);
        let mut pacer = Pacer::default();
        let mut down_pacer = Pacer::default();
        inbuf.reserve(32 * 1024);

        tracing::debug!(session = session.id, "tunnel loop starts");
        let end = loop {
            tokio::select! {
                // A kick comes first: when a session ends, its packet queue
                // closes right after the kick is sent, and the client must
                // get the TERMINATE frame rather than a bare close.
                biased;
                k = &mut kick => {
                    match k {
                        Ok(Kick::Terminate(reason)) => {
                            tracing::info!(user = session.user, "terminating tunnel: {reason}");
                            cstp::encode(&mut out, FrameType::Terminate, &[]);
                            let _ = wr.write_all(&out).await;
                            let _ = wr.flush().await;
                            // Let the client read the frame and hang up first:
                            // closing with unread input would send a RST, and a
                            // RST discards the frame before the client reads it.
                            let mut sink = vec![0u8; 16 * 1024];
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                while let Ok(n) = rd.read(&mut sink).await {
                                    if n == 0 {
                                        break;
                                    }
                                }
                            })
                            .await;
                        }
                        Ok(Kick::Replaced) | Err(_) => {}
                    }
                    break TunnelEnd::Kicked;
                }
                r = rd.read_buf(&mut inbuf) => {
                    match r {
                        Ok(0) => break TunnelEnd::Down("connection closed by client".into()),
                        Err(e) => break TunnelEnd::Down(format!("read error: {e}")),
                        Ok(_) => {}
                    }
                    last_rx = Instant::now();
                    if let Some(end) = self.handle_frames(&mut inbuf, session, &mut wr, &mut out, &mut pacer).await {
                        break end;
                    }
                }
                pkt = from_gw.recv() => {
                    let Some(pkt) = pkt else { break TunnelEnd::Kicked };
                    let mut next = Some(pkt);
                    // Drain what is queued, one TLS record per frame, then flush once.
                    while let Some(p) = next {
                        let rate = session.rate_down_bps.load(Ordering::Relaxed);
                        let wait = down_pacer.delay(p.len(), rate, Instant::now());
                        if !wait.is_zero() {
                            let _ = wr.flush().await;
                            tokio::time::sleep(wait).await;
                        }
                        if p.len() <= cstp::MAX_PAYLOAD {
                            cstp::encode(&mut out, FrameType::Data, &p);
                            if wr.write_all(&out).await.is_err() {
                                break;
                            }
                        }
                        next = from_gw.try_recv().ok();
                    }
                    if wr.flush().await.is_err() {
                        break TunnelEnd::Down("write error".into());
                    }
                }
                _ = tick.tick() => {
                    let silent = last_rx.elapsed();
                    if silent >= dpd * 3 {
                        break TunnelEnd::Down("dead peer detected (no DPD answer)".into());
                    }
                    if silent >= dpd && last_dpd_sent.elapsed() >= dpd / 2 {
                        cstp::encode(&mut out, FrameType::DpdRequest, &[]);
                        if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                            break TunnelEnd::Down("write error".into());
                        }
                        last_dpd_sent = Instant::now();
                    }
                }
            }
        };
        let _ = wr.shutdown().await;
        end
    }

    /// Handles the complete frames in `inbuf`; `Some` ends the tunnel.
    async fn handle_frames<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        inbuf: &mut BytesMut,
        session: &Arc<Session>,
        wr: &mut W,
        out: &mut Vec<u8>,
        pacer: &mut Pacer,
    ) -> Option<TunnelEnd> {
        loop {
            let frame = match cstp::decode(inbuf) {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(e) => {
                    tracing::info!(user = session.user, "ending tunnel: {e}");
                    return Some(TunnelEnd::Down(e.to_string()));
                }
            };
            match frame.ty {
                FrameType::Data => {
                    session.touch();
                    session.data_over_tls();
                    let rate = session.rate_up_bps.load(Ordering::Relaxed);
                    let wait = pacer.delay(frame.payload.len(), rate, Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    // Spoofed sources are the BPF program's to drop (and count).
                    if valid_ip_packet(&frame.payload)
                        && let Err(e) = self.tun.send(&frame.payload).await
                    {
                        tracing::debug!("tun write: {e}");
                    }
                }
                FrameType::DpdRequest => {
                    cstp::encode(out, FrameType::DpdResponse, &frame.payload);
                    if wr.write_all(out).await.is_err() || wr.flush().await.is_err() {
                        return Some(TunnelEnd::Down("write error".into()));
                    }
                }
                FrameType::Disconnect => {
                    if frame.payload.first() == Some(&cstp::DISCONNECT_LOGOUT) {
                        return Some(TunnelEnd::Logout);
                    }
                    // Cisco clients disconnect without 0xb0 for a network
                    // change: keep the session resumable.
                    return Some(TunnelEnd::Down("client disconnected temporarily".into()));
                }
                FrameType::DpdResponse | FrameType::Keepalive => {}
                FrameType::Compressed => {
                    // Never negotiated; a client sending it is broken.
                    return Some(TunnelEnd::Down(
                        "compressed frame without negotiation".into(),
                    ));
                }
                FrameType::Terminate => {
                    return Some(TunnelEnd::Down("client sent terminate".into()));
                }
            }
        }
    }
}

/// How a tunnel ended.
#[derive(Debug)]
enum TunnelEnd {
    /// The client logged out (DISCONNECT 0xb0): the session ends.
    Logout,
    /// The server closed it (admin, timeout, takeover).
    Kicked,
    /// The connection failed or the peer went silent: the session stays
    /// resumable.
    Down(String),
}

/// The DTLS mode chosen for a tunnel, as announced in the CONNECT answer.
enum DtlsAnswer {
    Psk {
        port: u16,
        app_id: [u8; 32],
    },
    Resume {
        port: u16,
        sid: [u8; 32],
        suite: &'static str,
    },
}

impl DtlsAnswer {
    /// The id a ClientHello carries in this mode.
    fn id(&self) -> &[u8; 32] {
        match self {
            DtlsAnswer::Psk { app_id, .. } => app_id,
            DtlsAnswer::Resume { sid, .. } => sid,
        }
    }
}

/// Whether the client offers DTLS in PSK-NEGOTIATE mode.
fn offers_psk_negotiate(req: &Request) -> bool {
    ["X-DTLS-CipherSuite", "X-DTLS12-CipherSuite"]
        .iter()
        .filter_map(|h| req.header(h))
        .any(|v| v.split(':').any(|c| c.trim() == "PSK-NEGOTIATE"))
}

/// The destination address of an IP packet.
pub fn packet_dst(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?)),
        6 if p.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?)),
        _ => None,
    }
}

fn valid_ip_packet(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.len() >= 20,
        Some(6) => p.len() >= 40,
        _ => false,
    }
}

/// openconnect decodes `%XX` in the banner: escape `%`, control characters
/// and non-ASCII bytes so multi-line and UTF-8 banners survive a header.
fn percent_encode_banner(b: &str) -> String {
    let mut out = String::with_capacity(b.len());
    for byte in b.bytes() {
        if byte == b'%' || !(0x20..0x7f).contains(&byte) {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push(byte as char);
        }
    }
    out
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
    use super::*;

    #[test]
    fn banner_encoding() {
        assert_eq!(percent_encode_banner("50% off\nnow"), "50%25 off%0Anow");
        assert_eq!(percent_encode_banner("Grüße"), "Gr%C3%BC%C3%9Fe");
    }

    #[test]
    fn packet_destination() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[198, 19, 0, 7]);
        assert_eq!(packet_dst(&v4), Some("198.19.0.7".parse().unwrap()));
        assert_eq!(packet_dst(&v4[..19]), None);
        assert_eq!(packet_dst(&[0x70; 40]), None);
    }
}
