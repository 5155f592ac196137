//! The daemon's start-up and shutdown: `vpnd` parses its arguments and
//! calls [`run`].

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;

use crate::{
    auth::users::UserDb,
    config::Settings,
    control,
    datapath::offloads::Offloads,
    events::EventLog,
    gateway::Gateway,
    login::LoginService,
    session::manager::SessionManager,
    transport::{listener::Listener, tls, tls_tunnel::TunnelService},
};

/// Runs the gateway with `settings` (read from `config_path`, which
/// `vpnctl reload` re-reads) until SIGTERM or SIGINT: sets up the TUN
/// device, the BPF data path, TLS and DTLS, the uplinks and the packet
/// workers, serves, and on the way out ends every session and removes
/// what it set up.
pub async fn run(settings: Settings, config_path: PathBuf) -> anyhow::Result<()> {
    raise_nofile(&settings);
    let events =
        EventLog::open(settings.server.event_log.as_deref()).context("opening server.event_log")?;
    let users = UserDb::open(settings.auth.users_file.clone())?;
    let identity = tls::load_identity(&settings)?;
    tracing::info!(
        cert = %identity.cert_path.display(),
        "server certificate fingerprint {} (openconnect --servercert)",
        identity.pin
    );
    let client_certs = crate::transport::client_cert::ClientVerifier::from_settings(&settings.tls)?;
    let tls_config = tls::server_config(&identity, settings.tls.tls13, client_certs.clone())?;
    // The identity feed's consumers show no client certificate.
    let feed_tls = tls::server_config(&identity, settings.tls.tls13, None)?;

    // Everything privileged (TUN device, BPF programs and maps, XDP
    // guards, uplinks) is the broker's; vpnd gets the TUN queues.
    let crate::broker::Started {
        broker,
        tun,
        tun_offload,
    } = crate::broker::Broker::start(&config_path)?;
    tracing::info!(
        pid = broker.pid(),
        "broker started: it holds the data path and the uplinks"
    );
    let tun = Arc::new(tun);
    let offloads = Offloads::decide(settings.device.offloads, tun_offload);
    let datapath: crate::datapath::bpf::SharedDatapath = Arc::new(parking_lot::Mutex::new(
        Box::new(crate::broker::RemoteDatapath(broker.clone())),
    ));

    let (tcp, acceptor) = crate::transport::listener::bind(&settings, tls_config).await?;
    let control_path = settings.server.control_socket.clone();
    let control = control::bind(&control_path, settings.control_gid)?;

    let users = Arc::new(users);
    let events = Arc::new(events);
    let sessions = SessionManager::new(&settings, datapath, events.clone(), users.clone())?;
    let dtls = if let Some(cfg) = &settings.dtls {
        let addr = cfg.listen;
        let dtls = crate::transport::dtls::DtlsServer::bind(
            addr,
            crate::transport::workers::count(&tun),
            tun.clone(),
            settings.session.dpd,
            cfg.coalesce,
            crate::transport::dtls::HandshakeLimits {
                total: cfg.max_handshakes,
                per_source: cfg.max_handshakes_per_source,
            },
            offloads,
        )
        .await?;
        // A session that ends takes its DTLS channel with it.
        let channels = dtls.clone();
        sessions.on_end(Box::new(move |id| channels.close_session(id)));
        tracing::info!(%addr, "DTLS (PSK-NEGOTIATE) listening");
        Some(dtls)
    } else {
        None
    };
    let bans = {
        let dp = sessions.datapath().clone();
        crate::auth::bans::Bans::new(
            settings.ban.clone(),
            Box::new(move |net, change| match change {
                Some(time) => Ok(dp.lock().ban(net, time)?),
                None => {
                    dp.lock().unban(net);
                    Ok(())
                }
            }),
            events.clone(),
        )
    };
    let admission = Arc::new(crate::auth::admission::Counters::default());
    let connections = crate::auth::admission::Connections::new(&settings.limits);
    let latencies = Arc::new(crate::telemetry::Latencies::default());
    let login = LoginService::new(
        &settings,
        crate::login::Backends::from_settings(&settings)?,
        latencies.clone(),
        users.clone(),
        sessions.clone(),
        events.clone(),
        crate::login::Guards {
            counters: admission.clone(),
            bans: bans.clone(),
        },
    );
    let tunnels = TunnelService::new(
        &settings,
        sessions.clone(),
        dtls.clone(),
        tun.clone(),
        events.clone(),
        bans.clone(),
    );
    let listener = Listener::new(
        &settings,
        connections.clone(),
        admission.clone(),
        login.clone(),
        tunnels.clone(),
        latencies.clone(),
        bans.clone(),
    );
    let gw = Arc::new(Gateway {
        settings: settings.clone(),
        config_path,
        users,
        events,
        tun,
        offloads,
        sessions,
        login,
        tunnels,
        listener,
        connections,
        admission,
        dtls,
        broker: broker.clone(),
        client_certs,
        latencies,
        bans,
    });

    let wiring = crate::transport::workers::Wiring {
        tun: gw.tun.clone(),
        sessions: gw.sessions.table().clone(),
        dtls: gw.dtls.clone(),
    };
    crate::transport::workers::start(&wiring, &tokio::runtime::Handle::current())
        .context("starting the packet workers")?;
    restore_sessions(&gw);
    tokio::spawn(gw.sessions.clone().reap());
    tokio::spawn(
        gw.bans
            .clone()
            .expire_every(std::time::Duration::from_secs(5)),
    );
    tokio::spawn(gw.sessions.clone().watch_users());
    tokio::spawn(gw.sessions.clone().follow_schedules());
    let accounting = settings.radius.as_ref().filter(|r| r.accounting).map(|r| {
        let a = crate::auth::accounting::Accounting::start(r);
        gw.sessions.set_accounting(a.clone());
        if let Some(every) = r.interim {
            tokio::spawn(gw.sessions.clone().report_interim(every));
        }
        a
    });
    if let Some(r) = &settings.radius {
        crate::session::dynamic_auth::start(r, gw.sessions.clone()).await?;
    }
    if let Some(addr) = settings.metrics {
        let l = crate::metrics::bind(addr).await?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        tokio::spawn(crate::metrics::serve(gw.clone(), l));
    }
    if let Some(f) = &settings.identity_feed {
        let l = crate::identity::bind(f.listen).await?;
        tracing::info!(addr = %f.listen, "identity feed at https://{}/v1/changes", f.listen);
        let feed = crate::identity::Feed::new(f, gw.sessions.journal().clone());
        tokio::spawn(crate::identity::serve(feed, l, feed_tls));
    }
    tokio::spawn(control::serve(gw.clone(), control));
    let serve = tokio::spawn(gw.listener.clone().serve(tcp, acceptor));
    // From here vpnd serves as nobody: the files it reads and writes
    // while serving are the broker's to reach.
    service_manager::connect();
    crate::files::set(Box::new(crate::broker::BrokerFiles(broker.clone())));
    {
        let broker = broker.clone();
        identity
            .key
            .restart_through(Box::new(move || broker.start_key_signer()));
    }
    drop_privileges();
    tracing::info!(listen = %settings.server.listen, control = %control_path.display(), "vpnd ready");
    service_manager::ready();

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut serve = serve;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); break }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = hup.recv() => {
                let gw = gw.clone();
                match tokio::task::spawn_blocking(move || gw.reload()).await? {
                    Ok(m) => tracing::info!("SIGHUP: {m}"),
                    Err(m) => tracing::error!("SIGHUP: {m}"),
                }
            }
            // The listener never returns; a panic in it ends the daemon.
            r = &mut serve => match r? {},
        }
    }
    service_manager::stopping();
    if settings.session.persist {
        // The sessions stay for the next start; their clients reconnect.
        gw.sessions.close_tunnels_for_restart();
        let path = crate::session::persist::path(&settings.server.state_dir);
        match gw.sessions.save(&path) {
            Ok(n) => tracing::info!("session.persist: {n} sessions saved to {}", path.display()),
            Err(e) => tracing::error!("session.persist: saving the sessions: {e:#}"),
        }
    } else {
        for s in gw.sessions.table().all() {
            gw.sessions
                .end(s.id, crate::session::EndReason::GatewayShutdown);
        }
    }
    // Give tunnels a moment to send their TERMINATE frames, and the
    // accounting Stops a few seconds to reach a server.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    if let Some(a) = &accounting {
        a.flush(std::time::Duration::from_secs(3)).await;
    }
    // The broker unpins the maps, removes the uplinks' routes, rules and
    // nft table and the control socket, and exits.
    if let Err(e) = broker.stop() {
        tracing::error!("stopping the broker: {e}");
    }
    Ok(())
}

/// `session.persist`: puts the saved sessions back and saves on each
/// change from now on. Off, a file an earlier run saved is removed, so
/// that turning it on later brings back nothing stale.
fn restore_sessions(gw: &Arc<Gateway>) {
    use crate::session::persist;
    let path = persist::path(&gw.settings.server.state_dir);
    if !gw.settings.session.persist {
        let _ = std::fs::remove_file(&path);
        return;
    }
    match persist::read(&path) {
        Ok(None) => {}
        Ok(Some(saved)) => {
            let (restored, left_out) = gw.sessions.restore(saved);
            for why in &left_out {
                tracing::warn!("session.persist: not restored: {why}");
            }
            tracing::info!(
                "session.persist: {restored} sessions restored from {}",
                path.display()
            );
            gw.events
                .emit(crate::events::Event::SessionsRestored { restored, left_out });
        }
        Err(e) => tracing::warn!("session.persist: {e:#}; starting without saved sessions"),
    }
    // Saved at once: what was left out does not come back next time.
    gw.sessions.table().changed.notify_one();
    tokio::spawn(gw.sessions.clone().save_on_change(path));
}

/// Descriptors at full load: a TCP socket per session and per login in
/// progress, plus the daemon's own (TUN queues, BPF maps and programs, DTLS
/// and control sockets, files). The soft limit is raised to that (and the
/// hard one when it is lower, which needs CAP_SYS_RESOURCE); when it
/// cannot be, the log says what to set.
fn raise_nofile(settings: &Settings) {
    let want = (settings.session.max_sessions + settings.limits.max_connections + 1024) as u64;
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on structs we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 || r.rlim_cur >= want {
        return;
    }
    let from = r.rlim_cur;
    let both = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(r.rlim_max),
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &both) } == 0 {
        tracing::info!(
            "descriptor limit raised from {from} to {want} (server.max_sessions + limits.max_connections + 1024)"
        );
        return;
    }
    let soft = libc::rlimit {
        rlim_cur: r.rlim_max,
        rlim_max: r.rlim_max,
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    tracing::warn!(
        "descriptor limit is {} but server.max_sessions = {} and limits.max_connections = {} need {want}: \
         logins beyond it will fail; raise LimitNOFILE (systemd) or `ulimit -n`",
        r.rlim_max,
        settings.session.max_sessions,
        settings.limits.max_connections
    );
}

/// The user vpnd serves as: nobody, nogroup (Debian's 65534).
const SERVING_USER: (u32, u32) = (65534, 65534);

/// Everything that needed a privilege (binding sockets, starting the
/// broker and the key signer, rlimits, reading the key and the files) is
/// done: every thread becomes nobody and drops every capability, and the
/// system calls a serving vpnd never makes fail. A failure is logged and
/// serving goes on (the service unit's bounding set still bounds the
/// process).
fn drop_privileges() {
    let (uid, gid) = SERVING_USER;
    match crate::privileges::become_user(uid, gid, std::time::Duration::from_secs(2)) {
        Ok(d) => tracing::info!(
            dropped = d.dropped.len(),
            threads = d.threads,
            "serving as uid {uid} gid {gid}; capabilities: none kept, dropped {} in every thread",
            d.dropped
        ),
        Err(e) => tracing::error!("privileges not dropped: {e}"),
    }
    match crate::privileges::forbid_system_calls() {
        Ok(n) => tracing::info!("seccomp: {n} system calls a serving vpnd never makes now fail"),
        Err(e) => tracing::error!("seccomp filter not applied: {e}"),
    }
}

/// Telling systemd (`Type=notify`) where the daemon is: READY=1 once it
/// serves, WATCHDOG=1 at half the watchdog interval while the runtime
/// runs, STOPPING=1 when it shuts down. Without `NOTIFY_SOCKET` (not
/// under systemd) each is a no-op. The socket is connected once, before
/// vpnd becomes nobody: its path may be under a directory only root can
/// search.
mod service_manager {
    use std::{os::unix::net::UnixDatagram, sync::OnceLock};

    static SOCKET: OnceLock<Option<UnixDatagram>> = OnceLock::new();

    /// Connects to `NOTIFY_SOCKET` (a path, or `@` and an abstract name).
    pub fn connect() {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
            let sock = UnixDatagram::unbound().ok()?;
            let connected = match path.as_bytes().strip_prefix(b"@") {
                Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| sock.connect_addr(&a)),
                None => sock.connect(&path),
            };
            match connected {
                Ok(()) => Some(sock),
                Err(e) => {
                    tracing::warn!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy());
                    None
                }
            }
        });
        let _ = SOCKET.set(socket);
    }

    fn notify(state: &str) -> std::io::Result<()> {
        match SOCKET.get() {
            Some(Some(s)) => s.send(state.as_bytes()).map(drop),
            _ => Ok(()),
        }
    }

    pub fn ready() {
        if let Err(e) = notify("READY=1") {
            tracing::warn!("telling the service manager we are ready: {e}");
        }
        if let Some(usec) = watchdog_usec() {
            let every = std::time::Duration::from_micros(usec / 2);
            tracing::info!("watchdog: pinging the service manager every {every:?}");
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let _ = notify("WATCHDOG=1");
                }
            });
        }
    }

    pub fn stopping() {
        let _ = notify("STOPPING=1");
    }

    /// The watchdog interval systemd asks for, as sd_watchdog_enabled(3)
    /// reads it: WATCHDOG_USEC, for this process unless WATCHDOG_PID
    /// names another.
    fn watchdog_usec() -> Option<u64> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        match std::env::var("WATCHDOG_PID").ok() {
            Some(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
            _ => (usec > 0).then_some(usec),
        }
    }
}
