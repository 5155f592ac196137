//! The login portal: the HTTP requests before CONNECT, answered by the
//! login flow (`auth::login`, which holds the rules) with the password
//! checks run off the runtime (argon2 on the verifier's threads, or a
//! RADIUS exchange), and the session a login earns created by the session
//! manager.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use parking_lot::{Mutex, RwLock};
use rand::RngCore as _;

use crate::{
    auth::Grant,
    auth::admission::{Lockout, LoginRefused},
    auth::login::{Checking, Ctx, Factor, FailReason, LoginEvent, Reply, Step, Verdict},
    auth::{
        admission::{self, Verifier},
        ldap::LdapClient,
        login::LoginFlow,
        radius::{AccessRequest, RadiusClient},
        users::UserDb,
    },
    config::{AuthMethod, GroupConfig, Settings},
    events::EventLog,
    events::{Event, LockoutScope},
    proto::auth_xml,
    proto::http::{Request, Response},
    session::manager::SessionManager,
};

/// A request's context for the login flow: a new login it may start gets a
/// 128-bit random handle.
fn login_ctx(peer: SocketAddr, cert_user: Option<&str>) -> Ctx {
    let mut h = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut h);
    Ctx {
        peer: peer.ip(),
        now: Instant::now(),
        new_handle: hex::encode(h),
        cert_user: cert_user.map(str::to_owned),
    }
}

/// Who checks passwords: the default method (`auth.method`), each
/// group's own (`[[group]] method`), and the clients of the directories
/// they name. Replaced whole by a reload (new logins use the new one).
pub struct Backends {
    default: AuthMethod,
    by_group: HashMap<String, AuthMethod>,
    second_factor: HashMap<String, AuthMethod>,
    radius: Option<RadiusClient>,
    ldap: Option<LdapClient>,
}

impl Backends {
    /// The checkers `settings` configure (LDAP's CA file is read here).
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Backends {
            default: settings.auth.method,
            by_group: settings
                .groups
                .iter()
                .filter_map(|g| g.method.map(|m| (g.name.clone(), m)))
                .collect(),
            second_factor: settings
                .groups
                .iter()
                .filter_map(|g| g.second_factor.map(|m| (g.name.clone(), m)))
                .collect(),
            radius: settings.radius.clone().map(RadiusClient::new),
            ldap: settings.ldap.clone().map(LdapClient::new).transpose()?,
        })
    }

    /// The method that checks `factor` in `group`.
    fn method(&self, group: &str, factor: Factor) -> AuthMethod {
        match factor {
            Factor::First => self.by_group.get(group).copied().unwrap_or(self.default),
            Factor::Second => self
                .second_factor
                .get(group)
                .copied()
                .unwrap_or(self.default),
        }
    }
}

/// What keeps count of refusals and misbehaviour for the login service.
pub struct Guards {
    /// Login and password-check refusals (`vpnctl stats`).
    pub counters: Arc<admission::Counters>,
    /// Ban points.
    pub bans: Arc<crate::auth::bans::Bans>,
}

/// The login portal's service: what answering a login takes.
pub struct LoginService {
    flow: Mutex<LoginFlow>,
    verifier: Verifier,
    users: Arc<UserDb>,
    backends: RwLock<Arc<Backends>>,
    /// Logins by result (success, failure reasons, unavailable, refused):
    /// keys from the gateway's own names, so few.
    outcomes: Mutex<std::collections::BTreeMap<String, u64>>,
    latencies: Arc<crate::telemetry::Latencies>,
    sessions: Arc<SessionManager>,
    events: Arc<EventLog>,
    /// Login and password-check refusals (`vpnctl stats`).
    counters: Arc<admission::Counters>,
    /// Wrong passwords and tries while locked out score ban points.
    bans: Arc<crate::auth::bans::Bans>,
    /// The groups shown in the form's selector.
    groups: Vec<GroupConfig>,
    /// The form's title (`server.name`).
    title: String,
    /// Shown after a login (`tunnel.banner`).
    banner: Option<String>,
    /// Each group's client profile, announced at login and served to its
    /// sessions (replaced by a reload).
    profiles: RwLock<Arc<crate::profile::Profiles>>,
    /// How long a login may take (`auth.timeout_secs`): the login cookie's
    /// age.
    login_secs: u64,
    lockout_window_secs: u64,
    /// New logins stop while the daemon's resident memory is above
    /// `limits.max_memory_mib` (changed by a reload).
    pub memory_ceiling: crate::resources::Ceiling,
    resident: Option<crate::resources::Resident>,
}

impl LoginService {
    pub fn new(
        settings: &Settings,
        backends: Backends,
        latencies: Arc<crate::telemetry::Latencies>,
        users: Arc<UserDb>,
        sessions: Arc<SessionManager>,
        events: Arc<EventLog>,
        Guards { counters, bans }: Guards,
    ) -> Arc<Self> {
        Arc::new(LoginService {
            flow: Mutex::new(LoginFlow::new(
                &settings.limits,
                &settings.auth,
                settings.groups.clone(),
            )),
            verifier: Verifier::new(&settings.limits),
            users,
            backends: RwLock::new(Arc::new(backends)),
            outcomes: Mutex::default(),
            latencies,
            sessions,
            events,
            counters,
            bans,
            groups: settings.groups.clone(),
            title: settings.server.name.clone(),
            banner: settings.tunnel.banner.clone(),
            profiles: RwLock::new(settings.profiles.clone()),
            login_secs: settings.auth.timeout_secs,
            lockout_window_secs: settings.limits.lockout_window_secs,
            memory_ceiling: {
                let c = crate::resources::Ceiling::default();
                c.set(settings.limits.max_memory_mib << 20);
                c
            },
            resident: crate::resources::Resident::open()
                .inspect_err(|e| tracing::warn!("limits.max_memory_mib cannot be applied: {e}"))
                .ok(),
        })
    }

    /// The answer to a request that cannot be served for want of
    /// `what` (memory, descriptors): a login is told why and gives up
    /// (openconnect prints it), anything else gets 503 (a tunnel's
    /// reconnection tries again).
    pub fn unavailable(&self, req: &Request, what: &str) -> Response {
        let why =
            format!("the gateway is out of {what} and takes no new logins now; try again later");
        if req.method == "POST" {
            Response::xml(auth_xml::fatal_error(&self.title, &why)).closing()
        } else {
            Response::text(503, "Service Unavailable", format!("{why}\n")).closing()
        }
    }

    /// The daemon's resident memory now, when it can be read.
    pub fn resident_bytes(&self) -> Option<u64> {
        self.resident.as_ref()?.bytes().ok()
    }

    /// The resident memory over the ceiling, as (resident, ceiling) bytes,
    /// when it is.
    fn over_memory_ceiling(&self) -> Option<(u64, u64)> {
        let ceiling = self.memory_ceiling.get()?;
        let resident = self.resident.as_ref()?.bytes().ok()?;
        (resident > ceiling).then_some((resident, ceiling))
    }

    /// Logins so far by result, for the metrics.
    pub fn outcomes(&self) -> Vec<(String, u64)> {
        self.outcomes
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    fn outcome(&self, result: &str) {
        *self.outcomes.lock().entry(result.to_owned()).or_default() += 1;
    }

    /// Makes `b` check the passwords of new logins (a reload).
    pub fn set_backends(&self, b: Backends) {
        *self.backends.write() = Arc::new(b);
    }

    /// Announces and serves `p` from now on (a reload).
    pub fn set_profiles(&self, p: Arc<crate::profile::Profiles>) {
        *self.profiles.write() = p;
    }

    /// Logins in progress, sources and users locked out, password checks
    /// running or waiting, now.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let (pending, sources, users) = self.flow.lock().counts(Instant::now());
        (pending, sources, users, self.verifier.in_progress())
    }

    /// Answers a request of the authentication phase on a connection from
    /// `peer`, whose verified client certificate names `cert_user`.
    pub async fn route(
        self: &Arc<Self>,
        req: &Request,
        peer: SocketAddr,
        cert_user: Option<&str>,
    ) -> Response {
        match req.method.as_str() {
            "POST" => self.post(req, peer, cert_user).await,
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
                p if p.starts_with("/profiles/") => self.profile(req, peer),
                _ => Response::text(404, "Not Found", "not found\n"),
            },
            m => Response::text(405, "Method Not Allowed", format!("method {m} is not supported\n"))
                .header("Allow", "GET, POST, CONNECT"),
        }
    }

    /// `GET /profiles/<group>.xml`: the client profile, for a session of
    /// that group (its cookie). Anyone else gets 404, as for a file that
    /// does not exist, so the names of groups do not leak.
    fn profile(&self, req: &Request, peer: SocketAddr) -> Response {
        let profiles = self.profiles.read().clone();
        let session = req
            .cookie("webvpn")
            .and_then(|c| self.sessions.table().by_cookie(c));
        let found = match (&session, profiles.group_at(&req.path)) {
            (Some(s), Some(group)) if s.group == group => profiles.of_group(group),
            _ => None,
        };
        let Some(p) = found else {
            // Debug: a stranger's requests must not fill the log.
            tracing::debug!(
                %peer,
                path = %crate::proto::client_string(&req.path),
                session = session.is_some(),
                "client profile request refused"
            );
            return Response::text(404, "Not Found", "not found\n");
        };
        if let Some(s) = &session {
            tracing::info!(parent: &s.span, %peer, uri = %p.uri, sha1 = %p.sha1, "client profile sent");
        }
        let mut r = Response::new(200, "OK")
            .header("Content-Type", "text/xml")
            .header("Cache-Control", "no-store");
        r.body = p.bytes.to_vec();
        r
    }

    async fn post(
        self: &Arc<Self>,
        req: &Request,
        peer: SocketAddr,
        cert_user: Option<&str>,
    ) -> Response {
        let body = match std::str::from_utf8(&req.body) {
            Ok(b) => b,
            Err(_) => {
                return Response::text(400, "Bad Request", "the request body is not UTF-8 XML\n");
            }
        };
        let msg = match auth_xml::parse_client_auth(body) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(%peer, "rejected auth request: {e}");
                return Response::text(400, "Bad Request", format!("{e}\n"));
            }
        };
        if msg.kind != "logout"
            && let Some((resident, ceiling)) = self.over_memory_ceiling()
        {
            // Before any password check: argon2 alone takes 19 MiB.
            self.counters
                .logins_refused_memory
                .fetch_add(1, Ordering::Relaxed);
            self.outcome("refused_memory");
            tracing::warn!(
                %peer,
                "login refused: resident memory {} MiB is above limits.max_memory_mib = {}",
                resident >> 20,
                ceiling >> 20
            );
            return self.unavailable(req, "memory");
        }
        match msg.kind.as_str() {
            "init" => {
                // The URL path picks the group (group URL), an explicit
                // <group-select> overrides it.
                let step = self.flow.lock().init(
                    msg.group_select.as_deref(),
                    &req.path,
                    login_ctx(peer, cert_user),
                );
                match step {
                    // A certificate-only group: logged in by the handshake.
                    Step::Authenticated { group, user, grant } => {
                        self.complete(user, &group, grant, peer)
                    }
                    other => self.answer_login(other, peer, &req.path),
                }
            }
            "auth-reply" => {
                let started = Instant::now();
                let resp = self.auth_reply(req, msg, peer, cert_user).await;
                self.latencies
                    .login
                    .observe(started.elapsed().as_secs_f64());
                resp
            }
            "logout" => {
                if let Some(s) = msg
                    .session_token
                    .as_deref()
                    .and_then(|t| self.sessions.table().by_cookie(t))
                {
                    self.sessions
                        .end(s.id, crate::session::EndReason::UserLogout);
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

    fn count_refused(&self, r: &LoginRefused) {
        let c = &self.counters;
        match r {
            LoginRefused::Busy => &c.logins_refused_busy,
            LoginRefused::SourceBusy => &c.logins_refused_source_busy,
            LoginRefused::SourceLocked { .. } => &c.logins_refused_source_locked,
            LoginRefused::UserLocked { .. } => &c.logins_refused_user_locked,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// The answer to a refused login: 503 while the limits on logins in
    /// progress are reached (try again shortly), a final error form for a
    /// lockout (openconnect shows it and gives up).
    fn refused(&self, r: LoginRefused) -> Response {
        match r {
            LoginRefused::Busy | LoginRefused::SourceBusy => {
                Response::text(503, "Service Unavailable", format!("{}\n", r.message())).closing()
            }
            LoginRefused::SourceLocked { .. } | LoginRefused::UserLocked { .. } => {
                Response::xml(auth_xml::fatal_error(&self.title, &r.message())).closing()
            }
        }
    }

    /// The answer to a step of the login flow other than a password
    /// check or success (those are `auth_reply`'s).
    fn answer_login(&self, step: Step, peer: SocketAddr, path: &str) -> Response {
        match step {
            Step::Form {
                handle,
                group,
                error,
            } => {
                // A group URL (`/NAME`) fixes the group, as on an ASA.
                let locked = path.strip_prefix('/') == Some(group.as_str());
                self.form(&handle, &group, error.as_deref(), locked)
            }
            Step::Refused(r) => {
                self.count_refused(&r);
                if matches!(
                    r,
                    LoginRefused::SourceLocked { .. } | LoginRefused::UserLocked { .. }
                ) {
                    self.bans
                        .offence(peer.ip(), crate::auth::bans::Offence::LockedOut);
                }
                self.refused(r)
            }
            Step::CertificateRequired { message } => {
                Response::xml(auth_xml::fatal_error(&self.title, &message)).closing()
            }
            Step::TooManyFailures => {
                Response::text(401, "Authentication failed", "too many failed attempts\n").closing()
            }
            Step::Challenge {
                handle,
                group,
                prompt,
                error,
            } => Response::xml(auth_xml::challenge_form(
                &handle,
                &self.title,
                &group,
                &prompt,
                error.as_deref(),
            )),
            Step::Verify { .. } | Step::Authenticated { .. } => Response::text(
                500,
                "Internal Server Error",
                "the login could not go on; try again\n",
            )
            .closing(),
        }
    }

    /// Logs what the login flow reports.
    fn log_login_events(&self, events: Vec<LoginEvent>, peer: SocketAddr) {
        let window_secs = self.lockout_window_secs;
        for e in events {
            if let LoginEvent::Failed { reason, .. } = &e {
                self.outcome(&reason.to_string());
                if matches!(reason, FailReason::WrongPassword | FailReason::UnknownUser) {
                    self.bans
                        .offence(peer.ip(), crate::auth::bans::Offence::WrongPassword);
                }
            }
            self.events.emit(match e {
                LoginEvent::Failed { user, reason } => Event::AuthenticationFailed {
                    user,
                    source_address: peer.to_string(),
                    reason: reason.to_string(),
                },
                LoginEvent::Lockout(Lockout::Source { source, failures }) => Event::LoginLockout {
                    scope: LockoutScope::Source,
                    target: source.to_string(),
                    failures,
                    window_secs,
                },
                LoginEvent::Lockout(Lockout::User { user, failures }) => Event::LoginLockout {
                    scope: LockoutScope::User,
                    target: user,
                    failures,
                    window_secs,
                },
            });
        }
    }

    fn form(&self, handle: &str, group: &str, error: Option<&str>, locked: bool) -> Response {
        let groups: Vec<auth_xml::GroupOption<'_>> = self
            .groups
            .iter()
            .map(|g| auth_xml::GroupOption {
                name: &g.name,
                label: g.label.as_deref().unwrap_or(&g.name),
            })
            .collect();
        let body = auth_xml::login_form(&auth_xml::LoginForm {
            handle,
            title: &self.title,
            message: "Please enter your username and password.",
            error,
            groups: &groups,
            selected_group: group,
            locked,
        });
        Response::xml(body).header(
            "Set-Cookie",
            format!(
                "webvpncontext={handle}; Max-Age={}; Secure; HttpOnly",
                self.login_secs
            ),
        )
    }

    async fn auth_reply(
        self: &Arc<Self>,
        req: &Request,
        msg: auth_xml::ClientAuth,
        peer: SocketAddr,
        cert_user: Option<&str>,
    ) -> Response {
        let reply = Reply {
            handle: msg
                .handle
                .or_else(|| req.cookie("webvpncontext").map(str::to_owned)),
            group_select: msg.group_select,
            username: msg.username,
            password: msg.password,
            answer: msg.answer,
        };
        let mut events = Vec::new();
        let mut step = self
            .flow
            .lock()
            .reply(reply, login_ctx(peer, cert_user), &mut events);
        if let Step::Verify {
            handle,
            group,
            user,
            password,
            state,
            factor,
        } = step
        {
            let verdict = match self
                .check(&user, password, state, peer, &group, factor)
                .await
            {
                Ok(v) => v,
                Err(busy) => {
                    self.log_login_events(events, peer);
                    return busy;
                }
            };
            let checking = Checking {
                handle,
                group,
                user,
                factor,
            };
            step = self.flow.lock().verified(
                checking,
                verdict,
                login_ctx(peer, cert_user),
                &mut events,
            );
        }
        self.log_login_events(events, peer);
        let Step::Authenticated { group, user, grant } = step else {
            return self.answer_login(step, peer, &req.path);
        };
        self.complete(user, &group, grant, peer)
    }

    /// Creates the session a login earned, and answers with its cookie
    /// (or why there is none).
    fn complete(&self, user: String, group: &str, mut grant: Grant, peer: SocketAddr) -> Response {
        if grant.own_policy.is_none() && grant.source == crate::auth::AuthSource::Certificate {
            // A certificate-only login of a local user: their own policy.
            grant.own_policy = self.users.policy_of(&user).flatten();
        }
        match self.sessions.create(&user, group, &grant, peer.ip()) {
            Ok((session, cookie)) => {
                self.outcome("success");
                tracing::info!(parent: &session.span, %peer, "login succeeded");
                let profiles = self.profiles.read().clone();
                let profile = profiles.of_group(group).map(|p| auth_xml::ProfileRef {
                    uri: &p.uri,
                    sha1: &p.sha1,
                });
                Response::xml(auth_xml::complete(
                    session.id,
                    &cookie,
                    self.banner.as_deref(),
                    profile,
                ))
                .header("Set-Cookie", format!("webvpn={cookie}; Secure; HttpOnly"))
                .header(
                    "Set-Cookie",
                    "webvpncontext=; Max-Age=0; Secure; HttpOnly".to_string(),
                )
            }
            Err(refused) => {
                self.outcome("refused");
                let reason = refused.to_string();
                self.events.emit(Event::LoginRefused {
                    user,
                    source_address: peer.to_string(),
                    reason: reason.clone(),
                });
                Response::xml(auth_xml::fatal_error(&self.title, &reason))
            }
        }
    }

    /// Checks `password` for `user` with the configured method (`state`:
    /// it answers a RADIUS challenge). `Err` is the answer when the
    /// password checks are saturated (503, try again).
    async fn check(
        self: &Arc<Self>,
        user: &str,
        password: String,
        state: Option<Vec<u8>>,
        peer: SocketAddr,
        group: &str,
        factor: Factor,
    ) -> Result<Verdict, Response> {
        let backends = self.backends.read().clone();
        let method = backends.method(group, factor);
        let unavailable = match (method, &backends.radius, &backends.ldap) {
            (AuthMethod::Local, _, _) => None,
            (AuthMethod::Radius, Some(radius), _) => {
                let req = AccessRequest {
                    user,
                    password: &password,
                    state: state.as_deref(),
                    client: peer.ip(),
                };
                match radius.access(&req).await {
                    Ok(v) => return Ok(v),
                    Err(e) => Some(e.to_string()),
                }
            }
            (AuthMethod::Ldap, _, Some(ldap)) => match ldap.access(user, &password).await {
                Ok(v) => return Ok(v),
                Err(e) => Some(e.to_string()),
            },
            (m, _, _) => Some(format!(
                "{m:?} is not configured (validated settings always have it)"
            )),
        };
        if let Some(servers) = unavailable {
            self.outcome("unavailable");
            tracing::error!(%peer, "login of {user} not checked: {servers}");
            self.events.emit(Event::AuthenticationUnavailable {
                user: crate::proto::client_string(user),
                source_address: peer.to_string(),
                servers,
            });
            return Ok(Verdict::Unavailable);
        }
        let gw = self.clone();
        let u = user.to_owned();
        match self
            .verifier
            .run(peer.ip(), move || gw.users.authenticate(&u, &password))
            .await
        {
            Ok(result) => Ok(result.into()),
            Err(_) => {
                self.counters
                    .verifications_refused_busy
                    .fetch_add(1, Ordering::Relaxed);
                Err(Response::text(
                    503,
                    "Service Unavailable",
                    "the gateway is busy checking passwords; try again shortly\n",
                )
                .closing())
            }
        }
    }
}
