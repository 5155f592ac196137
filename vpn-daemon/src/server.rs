//! The gateway: shared state, the TLS listener and connection loop, group
//! policy application, and session lifecycle. The login lives in `login.rs`,
//! the tunnel in `tunnel.rs`.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    auth::users::UserDb,
    auth::{
        admission::{self, ConnectionRefused, ConnectionSlot, Connections, Verifier},
        login::LoginFlow,
    },
    config::{Config, Settings},
    datapath::bpf::Datapath,
    datapath::tun::Tun,
    events::{Event, EventLog},
    proto::http::{self, Response},
    session::manager::SessionManager,
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
    pub users: Arc<UserDb>,
    /// Sessions and what they hold (pool, data-path entries, policies).
    pub sessions: Arc<SessionManager>,
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
    /// The file `reload` re-reads.
    pub config_path: std::path::PathBuf,
    /// The DTLS server, when `[dtls] enabled`.
    pub dtls: std::sync::OnceLock<Arc<crate::transport::dtls::DtlsServer>>,
    /// The uplinks, when `[[uplink]]`s are configured.
    pub uplinks: std::sync::OnceLock<Arc<crate::net::uplinks::Uplinks>>,
    /// How TLS tunnels' reads were batched.
    pub tls_reads: crate::transport::read_batch::Counters,
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
        let users = Arc::new(users);
        let events = Arc::new(events);
        let sessions = SessionManager::new(
            &settings,
            Arc::new(Mutex::new(datapath)),
            events.clone(),
            users.clone(),
        )?;
        Ok(Arc::new(Gateway {
            users,
            sessions,
            events,
            tun,
            logins: Mutex::new(LoginFlow::new(
                &settings.raw.limits,
                &settings.raw.auth,
                settings.groups.clone(),
            )),
            connections: Connections::new(&settings.raw.limits),
            verifier: Verifier::new(&settings.raw.limits),
            admission: Default::default(),
            config_path,
            dtls: std::sync::OnceLock::new(),
            uplinks: std::sync::OnceLock::new(),
            tls_reads: Default::default(),
            settings,
        }))
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
        self.sessions.apply_policies(&new).map_err(|e| {
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

