//! The control socket `vpnctl` talks to: one JSON request per line, one JSON
//! response per line, on a Unix socket (the messages are
//! [`crate::api`]'s).
//!
//! Who may talk to it is checked twice: the socket file is created with its
//! final mode (0600, or 0660 with `server.control_group`), never briefly
//! with the umask's; and each connection's peer credentials
//! (`SO_PEERCRED`) must be root, the daemon's own user, or a member of the
//! control group, so a socket whose mode someone loosened still answers
//! nobody else. A request line is at most [`MAX_REQUEST`] bytes.

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::api::{
    EventQuery, PolicyRow, Pushed, Request, Response, RuleRow, SessionDetail, SessionRow, Stats,
    Timers,
};
use crate::{gateway::Gateway, mac::format_mac};

impl Gateway {
    pub fn session_rows(&self) -> Vec<SessionRow> {
        let stats = self.sessions.datapath().lock().all_session_stats();
        self.sessions
            .table()
            .all()
            .iter()
            .map(|s| {
                let st = stats.of(s.addresses());
                let link = self.dtls.as_ref().and_then(|d| d.link_for(s.id));
                let slot = s.tunnel.lock();
                SessionRow {
                    id: s.id,
                    user: s.user.clone(),
                    group: s.group.clone(),
                    vpn_address: s.lease.v4.to_string(),
                    vpn_address6: s.lease.v6.map(|a| a.to_string()),
                    public_address: slot.peer.map(|p| p.ip().to_string()),
                    public_port: slot.peer.map(|p| p.port()),
                    dtls_peer: link.as_ref().map(|l| l.addr().to_string()),
                    since: humantime::format_rfc3339_seconds(s.created).to_string(),
                    state: if slot.handle.is_some() {
                        "connected"
                    } else {
                        "disconnected"
                    }
                    .into(),
                    transport: if link.is_some() {
                        "dtls"
                    } else if slot.handle.is_some() {
                        "tls"
                    } else {
                        "-"
                    }
                    .into(),
                    group_policy: s.policy.lock().effective.clone(),
                    denied_in: st.rx_denied,
                    denied_out: st.tx_denied,
                    bytes_in: st.rx_bytes,
                    bytes_out: st.tx_bytes,
                    packets_in: st.rx_packets,
                    packets_out: st.tx_packets,
                    pseudo_mac: format_mac(&s.mac),
                    spoofed_dropped: s.spoofed_dropped.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// `vpnctl show TARGET`: the sessions of a user name, or the one
    /// holding an address.
    pub fn show(&self, target: &str) -> Vec<SessionDetail> {
        let ip: Option<std::net::IpAddr> = target.parse().ok();
        let rows = self.session_rows();
        let now = std::time::Instant::now();
        self.sessions
            .table()
            .all()
            .into_iter()
            .filter(|s| match ip {
                Some(ip) => s.addresses().any(|a| a == ip),
                None => s.user == target,
            })
            .filter_map(|s| {
                let row = rows.iter().find(|r| r.id == s.id)?.clone();
                let p = s.tunnel_params(&self.settings.tunnel);
                let (routing, routes) = match &p.routing {
                    crate::config::Routing::All => ("all", &[][..]),
                    crate::config::Routing::Include(n) => ("include", &n[..]),
                    crate::config::Routing::Exclude(n) => ("exclude", &n[..]),
                };
                let age = now.saturating_duration_since(s.started);
                let idle_for = age.saturating_sub(std::time::Duration::from_millis(
                    s.last_activity_ms.load(Ordering::Relaxed),
                ));
                let limits = s.own_timeouts.apply(&self.sessions.limits().timeouts);
                let down_since = s.tunnel.lock().down_since;
                let policy = s.policy.lock().effective.clone();
                Some(SessionDetail {
                    session: row,
                    authenticated_by: format!("{:?}", s.auth_source).to_lowercase(),
                    login_from: s.login_from.to_string(),
                    pushed: Pushed {
                        address: format!("{}/{}", s.lease.v4, self.settings.pool_v4.prefix_len()),
                        address6: s.lease.v6.zip(p.prefix_v6).map(|(a, l)| format!("{a}/{l}")),
                        dns: p.dns.iter().map(ToString::to_string).collect(),
                        default_domain: p.default_domain.clone(),
                        routing: routing.into(),
                        routes: routes.iter().map(ToString::to_string).collect(),
                        local_lan_access: p.local_lan_access,
                        mtu: p.mtu,
                        session_timeout_secs: p.session_timeout.as_secs(),
                        idle_timeout_secs: p.idle_timeout_secs,
                        disconnected_timeout_secs: p.disconnected_timeout_secs,
                        dpd_secs: p.dpd_secs,
                        keepalive_secs: p.keepalive_secs,
                        banner: p.banner.clone(),
                    },
                    timers: Timers {
                        session_left_secs: limits.session.saturating_sub(age).as_secs(),
                        idle_left_secs: (!limits.idle.is_zero())
                            .then(|| limits.idle.saturating_sub(idle_for).as_secs()),
                        disconnected_left_secs: down_since.map(|d| {
                            limits
                                .disconnected
                                .saturating_sub(now.saturating_duration_since(d))
                                .as_secs()
                        }),
                    },
                    rules: policy
                        .and_then(|n| self.sessions.policies().get(&n))
                        .map(|p| self.rule_rows(&p))
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The rules of policy `p` with their hits.
    fn rule_rows(&self, p: &crate::policies::Installed) -> Vec<RuleRow> {
        let n = p.def.rules.len() as u32;
        let hits = self
            .sessions
            .datapath()
            .lock()
            .rule_hits(p.first_slot..p.first_slot + n);
        p.def
            .rules
            .iter()
            .zip(hits)
            .enumerate()
            .map(|(i, (r, hits))| RuleRow {
                index: i + 1,
                rule: r.describe(),
                comment: r.comment.clone(),
                hits,
            })
            .collect()
    }

    /// `vpnctl events`: the events of the log that `q` asks for, and where
    /// the log ends now. Reads at most the log's last 8 MiB (from
    /// `q.from` when set).
    pub fn events(&self, q: &EventQuery) -> Result<(Vec<serde_json::Value>, u64), String> {
        const WINDOW: u64 = 8 << 20;
        let Some(path) = &self.settings.server.event_log else {
            return Err("no event log: set server.event_log".into());
        };
        let since = q
            .since
            .as_deref()
            .map(|t| {
                humantime::parse_rfc3339_weak(t)
                    .map_err(|e| format!("since '{t}' is not an RFC 3339 time: {e}"))
            })
            .transpose()?;
        // A log that shrank was rotated: start over.
        let from = |len: u64| match q.from {
            Some(from) if from <= len => from,
            Some(_) => 0,
            None => len.saturating_sub(WINDOW),
        };
        let (start, text) = self
            .events
            .read(from, WINDOW)
            .unwrap_or(Ok((0, String::new())))
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        // Only whole lines: a line being written is read next time.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        let mut events: Vec<serde_json::Value> = text[..whole]
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| q.user.as_ref().is_none_or(|u| e["user"] == *u.as_str()))
            .filter(|e| q.kind.as_ref().is_none_or(|k| e["event"] == *k.as_str()))
            .filter(|e| {
                since.is_none_or(|s| {
                    e["time"]
                        .as_str()
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                        .is_some_and(|t| t >= s)
                })
            })
            .collect();
        if q.limit > 0 && events.len() > q.limit {
            events.drain(..events.len() - q.limit);
        }
        Ok((events, start + whole as u64))
    }

    /// Every figure of `vpnctl stats`, now.
    pub fn stats(&self) -> Stats {
        let (pool_in_use, pool_capacity) = self.sessions.pool_usage();
        Stats {
            sessions: self.sessions.table().len(),
            max_sessions: self.settings.server.max_sessions,
            pool_in_use,
            pool_capacity,
            drops: {
                let dp = self.sessions.datapath().lock();
                dp.drops()
                    .into_iter()
                    .map(|(r, n)| (r.name().to_owned(), n))
                    .chain(
                        dp.guard_drops()
                            .into_iter()
                            .map(|(r, n)| (r.name().to_owned(), n)),
                    )
                    .collect()
            },
            daemon_drops: vec![("spoofed-source".into(), self.sessions.spoofed_total())],
            offloads: Some(self.offloads),
            dtls_rx: self.dtls.as_ref().map(|d| d.rx_stats()),
            dtls_flow_control: self.dtls.as_ref().map(|d| d.flow_control_stats()),
            dtls_pacing: self.dtls.as_ref().map(|d| d.pacing_stats()),
            dtls_handshakes: self.dtls.as_ref().map(|d| d.handshake_stats()),
            tls_reads: self.tunnels.read_stats(),
            admission: self.admission_stats(),
            accounting: self.sessions.accounting_stats(),
            bans: self.bans.stats(),
        }
    }

    /// `(policy, rule number, hits)` of the first `max` rules of each
    /// installed policy.
    pub fn rule_hits(&self, max: usize) -> Vec<(String, usize, u64)> {
        let set = self.sessions.policies();
        let all = set.all();
        drop(set);
        let dp = self.sessions.datapath().lock();
        all.iter()
            .flat_map(|p| {
                let n = p.def.rules.len().min(max) as u32;
                let hits = dp.rule_hits(p.first_slot..p.first_slot + n);
                hits.into_iter()
                    .enumerate()
                    .map(|(i, h)| (p.def.name.clone(), i + 1, h))
            })
            .collect()
    }

    fn policy_row(&self, p: &crate::policies::Installed, default: Option<&str>) -> PolicyRow {
        let sessions = self
            .sessions
            .table()
            .all()
            .iter()
            .filter(|s| s.policy.lock().id == p.id)
            .count();
        PolicyRow {
            name: p.def.name.clone(),
            id: p.id,
            rules: p.def.rules.len(),
            sessions,
            default: default == Some(p.def.name.as_str()),
            client_isolation: p.def.info.flags & vpn_common::POLICY_ISOLATE != 0,
            split_enforcement: p.def.info.flags & vpn_common::POLICY_SPLIT_ENFORCE != 0,
            bandwidth_up_kbps: p.def.info.rate_up_bps / 1000,
            bandwidth_down_kbps: p.def.info.rate_down_bps / 1000,
            map_entries: p.compiled.entries(),
        }
    }

    /// [`Self::answer`], serialised with its newline, on a blocking thread
    /// rather than the runtime's: a reload reads files and writes maps,
    /// and the session list at 10,000 sessions is 4 MB of JSON (tens of
    /// milliseconds the packet and login tasks would wait for).
    async fn answer_async(self: Arc<Self>, line: String) -> Vec<u8> {
        tokio::task::spawn_blocking(move || encode(&self.answer(&line)))
            .await
            .unwrap_or_else(|e| {
                encode(&Response::Error {
                    error: format!("the request failed: {e}"),
                })
            })
    }

    fn answer(&self, line: &str) -> Response {
        match serde_json::from_str::<Request>(line) {
            Err(e) => Response::Error {
                error: format!("bad request: {e}"),
            },
            Ok(Request::Sessions) => Response::Sessions {
                sessions: self.session_rows(),
            },
            Ok(Request::Uplinks) => Response::Uplinks {
                uplinks: if self.settings.uplinks.is_empty() {
                    Vec::new()
                } else {
                    self.broker.uplinks()
                },
            },
            Ok(Request::WebProxies) => Response::WebProxies {
                web_proxies: if self.settings.web_proxies.is_empty() {
                    Vec::new()
                } else {
                    self.broker.web_proxies()
                },
            },
            Ok(Request::Stats) => Response::Stats {
                stats: Box::new(self.stats()),
            },
            Ok(Request::Reload) => match self.reload() {
                Ok(reloaded) => Response::Reloaded { reloaded },
                Err(e) => Response::Error {
                    error: e.to_string(),
                },
            },
            Ok(Request::Policies) => {
                let set = self.sessions.policies();
                let default = set.default_name().map(str::to_owned);
                let all = set.all();
                drop(set);
                Response::Policies {
                    policies: all
                        .iter()
                        .map(|p| self.policy_row(p, default.as_deref()))
                        .collect(),
                }
            }
            Ok(Request::Policy { name }) => {
                let set = self.sessions.policies();
                let default = set.default_name().map(str::to_owned);
                let found = set.get(&name);
                let names: Vec<String> = set.all().iter().map(|p| p.def.name.clone()).collect();
                drop(set);
                match found {
                    None => Response::Error {
                        error: format!(
                            "no group policy '{name}' (installed: {})",
                            names.join(", ")
                        ),
                    },
                    Some(p) => Response::Policy {
                        policy: self.policy_row(&p, default.as_deref()),
                        rules: self.rule_rows(&p),
                    },
                }
            }
            Ok(Request::Events(q)) => match self.events(&q) {
                Ok((events, next)) => Response::Events { events, next },
                Err(error) => Response::Error { error },
            },
            Ok(Request::Show { target }) => match self.show(&target) {
                d if d.is_empty() => Response::Error {
                    error: format!("no session of a user or at an address '{target}'"),
                },
                details => Response::Show { details },
            },
            Ok(Request::Bans) => Response::Bans {
                bans: self.bans.list().iter().map(ban_row).collect(),
            },
            Ok(Request::Ban { source, secs }) => match parse_prefix(&source) {
                Ok(net) => Response::Banned {
                    banned: ban_row(&self.bans.add(net, secs.map(Duration::from_secs))),
                },
                Err(error) => Response::Error { error },
            },
            Ok(Request::Unban { source }) => match parse_prefix(&source) {
                Ok(net) => match self.bans.remove(net) {
                    Some(b) => Response::Unbanned {
                        unbanned: ban_row(&b),
                    },
                    None => Response::Error {
                        error: format!(
                            "no ban of {net} (vpnctl ban list shows them; a ban is lifted by its exact prefix)"
                        ),
                    },
                },
                Err(error) => Response::Error { error },
            },
            Ok(Request::Disconnect { target }) => match self.sessions.disconnect(&target) {
                Ok(n) => Response::Disconnected { disconnected: n },
                Err(e) => Response::Error {
                    error: e.to_string(),
                },
            },
        }
    }
}

/// An address (its /32 or /128) or a prefix, as `vpnctl ban` takes them.
fn parse_prefix(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| {
            format!("'{s}' is not an address or a prefix: use e.g. 198.18.7.1, 198.18.7.0/24 or fd00:7::/64")
        })
}

fn ban_row(b: &crate::auth::bans::Ban) -> crate::api::BanRow {
    crate::api::BanRow {
        source: b.net.to_string(),
        since: humantime::format_rfc3339_seconds(b.since).to_string(),
        // Rounded up: a ban of 3 s just made has "3s" left.
        secs_left: b.until.map(|u| {
            u.saturating_duration_since(std::time::Instant::now())
                .as_millis()
                .div_ceil(1000) as u64
        }),
        reason: b.reason.clone(),
    }
}

/// The longest request line; a longer one gets an error and the
/// connection closes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Binds the control socket, replacing a stale one: mode 0600, or 0660
/// and group `group` (a gid) when one is configured. The mode is set on
/// the socket before it is bound, so the file never exists with a looser
/// one.
pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    use std::os::{
        fd::AsRawFd,
        unix::fs::{PermissionsExt, chown},
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another vpnd is already listening on {} (server.control_socket)",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // SAFETY: fchmod on a socket we own. Linux gives the socket file the
    // mode of the socket's inode when it is bound (less the umask).
    if unsafe { libc::fchmod(s.as_raw_fd(), mode) } != 0 {
        return Err(std::io::Error::last_os_error()).context("fchmod on the control socket");
    }
    s.bind(&socket2::SockAddr::unix(path)?)
        .with_context(|| format!("binding {}", path.display()))?;
    s.listen(64)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = group {
        chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    s.set_nonblocking(true)?;
    Ok(UnixListener::from_std(s.into())?)
}

/// Whether the peer with `uid` and primary `gid` may use the control
/// socket: root, the daemon's own user, or a member of `group`.
fn allowed(uid: u32, gid: u32, group: Option<u32>) -> bool {
    // SAFETY: geteuid cannot fail.
    if uid == 0 || uid == unsafe { libc::geteuid() } {
        return true;
    }
    group.is_some_and(|g| gid == g || crate::unix_users::in_group(uid, g))
}

/// Serves control requests forever.
pub async fn serve(gw: Arc<Gateway>, listener: UnixListener) {
    let group = gw.settings.control_gid;
    // At the descriptor limit vpnctl still gets in, one at a time.
    let spare = crate::resources::SpareDescriptor::new();
    loop {
        let mut spare_used = None;
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                spare.restore();
                s
            }
            Err(e)
                if crate::resources::out_of_descriptors(&e)
                    && let Some(g) = spare.give_up() =>
            {
                // Linux fails accept at the limit before it looks for a
                // connection: with the spare given up it waits for one.
                let s = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                };
                if !g.take_back() {
                    spare_used = Some(g);
                }
                s
            }
            Err(e) => {
                // Back off instead of spinning. (At the descriptor limit
                // with the spare in use; the TLS listener says so in the
                // log.)
                if crate::resources::out_of_descriptors(&e) {
                    tracing::debug!("control socket accept failed: {e}");
                } else {
                    tracing::warn!("control socket accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let _spare_used = spare_used;
            let (rd, mut wr) = stream.into_split();
            let reply = async |wr: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response| {
                wr.write_all(&encode(resp)).await
            };
            let cred = rd.as_ref().peer_cred();
            let who = cred.as_ref().map(|c| (c.uid(), c.gid()));
            let permitted = who.is_ok_and(|(uid, gid)| allowed(uid, gid, group));
            let mut rd = BufReader::new(rd);
            let mut line = Vec::new();
            loop {
                line.clear();
                let mut limited = (&mut rd).take(MAX_REQUEST as u64 + 1);
                let read = limited.read_until(b'\n', &mut line);
                match tokio::time::timeout(Duration::from_secs(30), read).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(_)) => {}
                }
                if line.last() != Some(&b'\n') {
                    let error = format!("request longer than {MAX_REQUEST} bytes");
                    let _ = reply(&mut wr, &Response::Error { error }).await;
                    return;
                }
                if !permitted {
                    tracing::warn!(peer = ?who, "control socket: refused a client that is neither root nor in server.control_group");
                    let error = format!(
                        "permission denied: {} may not control vpnd (root, or a member of server.control_group)",
                        who.map_or_else(|_| "this client".into(), |(uid, _)| format!("uid {uid}"))
                    );
                    let _ = reply(&mut wr, &Response::Error { error }).await;
                    return;
                }
                let answer = match std::str::from_utf8(&line) {
                    Ok(text) => gw.clone().answer_async(text.trim_end().to_owned()).await,
                    Err(_) => encode(&Response::Error {
                        error: "bad request: not UTF-8".into(),
                    }),
                };
                if wr.write_all(&answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A response as the control protocol sends it: one line of JSON.
fn encode(resp: &Response) -> Vec<u8> {
    let rows = match resp {
        Response::Sessions { sessions } => sessions.len(),
        _ => 1,
    };
    // About 400 bytes a session row: one allocation, not a dozen
    // doublings of a 4 MB buffer.
    let mut out = Vec::with_capacity(512 * rows);
    serde_json::to_writer(&mut out, resp).expect("responses serialise");
    out.push(b'\n');
    out
}

/// Client side: sends one request and reads the response.
pub async fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    Ok(serde_json::from_str(&call_line(path, req).await?)?)
}

/// Sends one request and reads its answer as `T`, the shape the answer
/// to that request has (or fails with the daemon's error). Faster than
/// [`call`] for large answers: an untagged [`Response`] is buffered whole
/// before its variants are tried, which for `sessions` at 10,000 sessions
/// (4 MB) took vpnctl longer than the daemon took to answer.
pub async fn call_as<T: serde::de::DeserializeOwned>(
    path: &Path,
    req: &Request,
) -> anyhow::Result<T> {
    let line = call_line(path, req).await?;
    serde_json::from_str(&line).map_err(|e| match answer_error(&line) {
        Some(error) => anyhow::anyhow!(error),
        None => e.into(),
    })
}

/// The daemon's error, when `line` is one.
pub fn answer_error(line: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Failed {
        error: String,
    }
    serde_json::from_str::<Failed>(line).ok().map(|f| f.error)
}

/// Sends one request and returns the answer's line, as vpnd wrote it.
pub async fn call_line(path: &Path, req: &Request) -> anyhow::Result<String> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach vpnd at {} (is it running? use --socket to point elsewhere)",
            path.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    lines
        .next_line()
        .await?
        .context("vpnd closed the control connection without answering")
}
