//! `vpnd`: the vpn-gateway daemon.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vpn_daemon::{
    auth::users::UserDb, config::Config, control, datapath::bpf::Datapath, datapath::tun::Tun,
    events::EventLog, net::netlink, server, transport::tls,
};

/// vpn-gateway daemon: an AnyConnect/OpenConnect-compatible VPN headend
/// with per-session policy in eBPF.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML; see examples/gateway.toml).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate FILE and exit: 0 if valid, 2 with the reason if not.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(path) = args.check_config {
        return match Config::load(&path) {
            Ok(_) => {
                println!("{}: configuration is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        };
    }
    let Some(path) = args.config else {
        eprintln!(
            "vpnd: give --config FILE (or --check-config FILE); `cargo xtask run` starts a demo"
        );
        return ExitCode::from(2);
    };
    let settings = match Config::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(settings, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: vpn_daemon::config::Settings, config_path: PathBuf) -> anyhow::Result<()> {
    let raw = &settings.raw;
    let events =
        EventLog::open(raw.server.event_log.as_deref()).context("opening server.event_log")?;
    let users = UserDb::open(raw.auth.users_file.clone())?;
    let identity = tls::load_identity(&settings)?;
    tracing::info!(
        cert = %identity.cert_path.display(),
        "server certificate fingerprint {} (openconnect --servercert)",
        identity.pin
    );
    let tls_config = tls::server_config(&identity, raw.tls.tls13.unwrap_or(true))?;

    // A TUN queue and a packet worker per core, and a queue for the TLS
    // tunnels.
    let tun = Arc::new(
        Tun::create(
            &raw.tunnel.device,
            vpn_daemon::transport::workers::tun_queues(),
        )
        .with_context(|| format!("creating TUN device {} (tunnel.device)", raw.tunnel.device))?,
    );
    let mut addrs = vec![(settings.gateway_v4().into(), settings.pool_v4.prefix_len())];
    if let (Some(a), Some(n)) = (settings.gateway_v6(), settings.pool_v6) {
        addrs.push((a.into(), n.prefix_len()));
    }
    netlink::configure_tunnel(tun.name(), raw.tunnel.mtu, &addrs).await?;
    netlink::enable_forwarding(settings.pool_v6.is_some())?;
    let datapath = Datapath::load(tun.name(), &raw.server.bpf_pin_dir)?;
    tracing::info!(pins = %raw.server.bpf_pin_dir.display(), "BPF programs attached to {}", tun.name());

    let (listener, acceptor) = server::bind(&settings, tls_config).await?;
    let control_path = raw.server.control_socket.clone();
    let control = control::bind(&control_path, settings.control_gid)?;
    let gw = server::Gateway::new(settings.clone(), config_path, users, datapath, events, tun)?;

    if raw.dtls.enabled {
        let mut addr = raw.server.listen;
        addr.set_port(raw.dtls.port.unwrap_or(addr.port()));
        let dpd = std::time::Duration::from_secs(raw.session.dpd_secs);
        let coalesce = std::time::Duration::from_micros(raw.dtls.rx_coalesce_usecs.into());
        let dtls = vpn_daemon::transport::dtls::DtlsServer::bind(
            addr,
            vpn_daemon::transport::workers::count(&gw.tun),
            gw.tun.clone(),
            dpd,
            coalesce,
            vpn_daemon::transport::dtls::HandshakeLimits {
                total: raw.dtls.max_handshakes,
                per_source: raw.dtls.max_handshakes_per_source,
            },
        )
        .await?;
        let _ = gw.dtls.set(dtls);
        let mut dp = gw.datapath.lock();
        dp.set_guard(vpn_common::GuardConfig {
            port: u32::from(addr.port()),
            hello_rate: raw.dtls.hello_rate,
            hello_burst: raw.dtls.hello_burst,
            _pad: 0,
        })?;
        for iface in &raw.dtls.xdp_interfaces {
            dp.attach_guard(iface)?;
            tracing::info!(iface, "XDP guard attached");
        }
        drop(dp);
        tracing::info!(%addr, "DTLS (PSK-NEGOTIATE) listening");
    }
    // Uplinks: routing tables, rules, the nft table and health checks.
    // Whatever a crashed run left is removed first, configured or not.
    vpn_daemon::net::uplinks::cleanup(&raw.failover)
        .await
        .context("removing stale uplink state")?;
    if !raw.uplinks.is_empty() {
        let u = vpn_daemon::net::uplinks::Uplinks::start(
            &raw.uplinks,
            &raw.failover,
            gw.datapath.clone(),
            gw.events.clone(),
        )
        .await?;
        let _ = gw.uplinks.set(u);
        tracing::info!(uplinks = raw.uplinks.len(), "uplinks managed");
    }
    let wiring = vpn_daemon::transport::workers::Wiring {
        tun: gw.tun.clone(),
        sessions: gw.sessions.clone(),
        dtls: gw.dtls.get().cloned(),
    };
    vpn_daemon::transport::workers::start(&wiring, &tokio::runtime::Handle::current())
        .context("starting the packet workers")?;
    tokio::spawn(gw.clone().reap());
    tokio::spawn(gw.clone().watch_users());
    tokio::spawn(gw.clone().follow_schedules());
    tokio::spawn(control::serve(gw.clone(), control));
    let serve = tokio::spawn(gw.clone().serve(listener, acceptor));
    tracing::info!(listen = %settings.raw.server.listen, control = %control_path.display(), "vpnd ready");

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
            r = &mut serve => { r??; break }
        }
    }
    for s in gw.sessions.all() {
        gw.end_session(s.id, "gateway shutting down");
    }
    // Give tunnels a moment to send their TERMINATE frames.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    gw.datapath.lock().unpin();
    if let Err(e) = vpn_daemon::net::uplinks::cleanup(&raw.failover).await {
        tracing::error!("removing uplink state: {e:#}");
    }
    let _ = std::fs::remove_file(&control_path);
    Ok(())
}
