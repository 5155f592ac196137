//! The authentication phase: the HTTP requests before CONNECT, the XML
//! aggregate-auth exchange, and creating the session a login earns.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use parking_lot::Mutex;
use rand::RngCore as _;
use vpn_common::SessionInfo;

use crate::{
    events::Event,
    http::{Request, Response},
    mac::pseudo_mac,
    server::Gateway,
    session::{PolicyBinding, Session, TunnelSlot, new_cookie},
    users::AuthResult,
    xml,
};

/// Logins in progress (between the first form and success) at most.
const MAX_PENDING_LOGINS: usize = 4096;

/// A login in progress, between the first form and success.
pub(crate) struct AuthState {
    group: String,
    failures: u32,
    started: Instant,
}

impl Gateway {
    /// Answers a request of the authentication phase.
    pub(crate) async fn route(self: &Arc<Self>, req: &Request, peer: SocketAddr) -> Response {
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
        let mut auth = self.auth.lock();
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

    /// A fresh form for a client whose login is unknown or over.
    fn expired(&self) -> Response {
        let group = self.settings.groups[0].name.clone();
        match self.start_login(group.clone()) {
            Some(h) => self.form(
                &h,
                &group,
                Some("your login attempt expired; please log in again"),
            ),
            None => Self::busy(),
        }
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
            let auth = self.auth.lock();
            auth.get(h)
                .filter(|s| s.started.elapsed() < ttl)
                .map(|s| s.group.clone())
        });
        let (handle, group) = match (handle, state_group) {
            (Some(h), Some(g)) => (h, g),
            _ => return self.expired(),
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
                // The login may have ended while the password was checked
                // (another request on its handle reached the failure limit
                // or succeeded, or it expired): to this client, it expired.
                let failures = self.auth.lock().get_mut(&handle).map(|s| {
                    s.failures += 1;
                    s.failures
                });
                let Some(failures) = failures else {
                    return self.expired();
                };
                if failures >= self.settings.raw.auth.max_failures {
                    self.auth.lock().remove(&handle);
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
        // One success per login: a handle that ended meanwhile earns nothing.
        if self.auth.lock().remove(&handle).is_none() {
            return self.expired();
        }
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
    pub(crate) fn create_session(
        &self,
        user: &str,
        group: &str,
        group_policy: Option<String>,
    ) -> Result<(Arc<Session>, String), String> {
        let max = self.settings.raw.server.max_sessions as usize;
        // The pool lock also serialises the limit check with the insert.
        // Lock order: pool, policies, datapath.
        let mut pool = self.pool.lock();
        let policies = self.policies.lock();
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
            spoofed_dropped: AtomicU64::new(0),
        });
        {
            let mut dp = self.datapath.lock();
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
}
