//! The broker itself: `vpnd --broker CONFIG`.

use std::{
    os::{
        fd::{AsRawFd, FromRawFd as _},
        unix::net::UnixStream,
    },
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{OffloadOff, Reply, Request, Setup, read_frame, send_fds, write_frame};
use crate::{
    config::{Config, Settings},
    datapath::{
        bpf::{Datapath, LocalDatapath},
        offloads::Off,
        tun::Tun,
    },
    events::EventLog,
    net::{netlink, uplinks::Uplinks},
};

/// The most rule counters one request reads or zeroes.
const MAX_SLOTS: u32 = 1 << 16;

/// The most key signers started for vpnd that may run at once (vpnd uses
/// one; one that failed ends when vpnd drops its socket).
const MAX_SIGNERS: usize = 4;

/// How long a new broker waits for an old one (of a vpnd that just
/// died) to be gone.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// What the broker holds while it serves.
struct Held {
    config: std::path::PathBuf,
    settings: Settings,
    /// The files vpnd may read through the broker: the configuration and
    /// what its latest good version names.
    readable: parking_lot::Mutex<Vec<std::path::PathBuf>>,
    datapath: LocalDatapath,
    uplinks: Option<Arc<Uplinks>>,
    web_proxies: Option<Arc<crate::net::web_proxy::WebProxies>>,
    /// Key signers started for vpnd, to reap.
    signers: parking_lot::Mutex<Vec<std::process::Child>>,
    /// Until the broker exits: no second broker sets up beside it.
    _lock: std::fs::File,
}

/// Runs the broker on the socket vpnd left as its standard input: sets
/// up, hands over the TUN queues, drops what it no longer needs and
/// answers until vpnd stops it or goes.
pub fn serve(config: &Path) -> anyhow::Result<()> {
    // SAFETY: fd 0 is the socket vpnd gave us, and nothing else owns it.
    let mut sock = unsafe { UnixStream::from_raw_fd(0) };
    // The broker stops when vpnd says (after vpnd's own shutdown) or dies
    // with it, never on its own: a SIGTERM to the whole service (systemd's
    // default) or a Ctrl-C to the terminal's process group must not take
    // it before vpnd has asked it to clean up.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to ignore.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("broker-rt")
        .enable_all()
        .build()
        .context("the broker's runtime")?;
    let held = match rt.block_on(set_up(config)) {
        Ok((held, tun, offload)) => {
            let fds: Vec<_> = (0..tun.queues())
                .map(|q| tun.queue(q).as_raw_fd())
                .collect();
            send_fds(&sock, &fds)?;
            let tun_offload = offload.err().map(|e| match e {
                Off::Configured => OffloadOff::Configured,
                Off::Kernel(e) => OffloadOff::Kernel(e.to_string()),
            });
            write_frame(
                &mut sock,
                &Setup::Ready {
                    tun: tun.name().to_owned(),
                    tun_offload,
                },
            )?;
            // vpnd holds the queues now: the device goes with vpnd.
            drop(tun);
            held
        }
        Err(e) => {
            send_fds(&sock, &[])?;
            write_frame(&mut sock, &Setup::Failed(format!("{e:#}")))?;
            return Ok(());
        }
    };
    drop_privileges();
    loop {
        let req = match read_frame::<Request>(&mut sock) {
            Ok(Some(r)) => r,
            // vpnd went without a stop: what it set up stays for the next
            // start to remove, as after any crash.
            Ok(None) => return Ok(()),
            Err(e) => bail!("reading vpnd's request: {e}"),
        };
        if let Request::Stop = req {
            rt.block_on(tear_down(&held));
            write_frame(&mut sock, &Reply::Done)?;
            return Ok(());
        }
        if let Request::StartKeySigner = req {
            match start_key_signer(&held) {
                Ok((pid, stream)) => {
                    write_frame(&mut sock, &Reply::KeySigner { pid })?;
                    send_fds(&sock, &[stream.as_raw_fd()])?;
                }
                Err(e) => write_frame(&mut sock, &Reply::Failed(format!("{e:#}")))?,
            }
            continue;
        }
        let reply = answer(&held, req);
        write_frame(&mut sock, &reply)?;
    }
}

/// Everything that takes privileges, in the order vpnd did it.
async fn set_up(config: &Path) -> anyhow::Result<(Held, Tun, Result<(), Off>)> {
    let settings = Config::load(config)?;
    let lock = lock(&settings.server.state_dir)?;
    let events = Arc::new(
        EventLog::open(settings.server.event_log.as_deref()).context("opening server.event_log")?,
    );
    // A TUN queue per packet worker and one for the TLS tunnels.
    let (tun, tun_offload) = Tun::create(
        &settings.device.name,
        crate::transport::workers::tun_queues(),
        settings.device.offloads,
    )
    .with_context(|| {
        format!(
            "creating TUN device {} (tunnel.device)",
            settings.device.name
        )
    })?;
    let mut addrs = vec![(settings.gateway_v4().into(), settings.pool_v4.prefix_len())];
    if let (Some(a), Some(n)) = (settings.gateway_v6(), settings.pool_v6) {
        addrs.push((a.into(), n.prefix_len()));
    }
    netlink::configure_tunnel(tun.name(), settings.device.mtu, &addrs).await?;
    netlink::enable_forwarding(settings.pool_v6.is_some())?;
    let mut datapath = Datapath::load(tun.name(), &settings.server.bpf_pin_dir)?;
    tracing::info!(pins = %settings.server.bpf_pin_dir.display(), "BPF programs attached to {}", tun.name());
    if let Some(cfg) = &settings.dtls {
        datapath.set_guard(vpn_common::GuardConfig {
            port: u32::from(cfg.listen.port()),
            hello_rate: cfg.hello_rate,
            hello_burst: cfg.hello_burst,
            tls_port: u32::from(settings.server.listen.port()),
        })?;
        for iface in &cfg.xdp_interfaces {
            datapath.attach_guard(iface)?;
            tracing::info!(iface, "XDP guard attached");
        }
    }
    let datapath = Arc::new(parking_lot::Mutex::new(datapath));
    // Uplinks: routing tables, rules, the nft table and health checks.
    // Whatever a crashed run left is removed first, configured or not.
    crate::net::uplinks::cleanup(&settings.failover)
        .await
        .context("removing stale uplink state")?;
    crate::net::web_proxy::cleanup(&settings.failover)
        .await
        .context("removing stale web proxy routes")?;
    let web_proxies = if settings.web_proxies.is_empty() {
        None
    } else {
        let w = crate::net::web_proxy::WebProxies::start(
            &settings.web_proxies,
            &settings.failover,
            datapath.clone(),
            events.clone(),
        )
        .await?;
        tracing::info!(
            proxies = settings.web_proxies.len(),
            "web proxy redirection set up"
        );
        Some(w)
    };
    let uplinks = if settings.uplinks.is_empty() {
        None
    } else {
        let u = Uplinks::start(
            &settings.uplinks,
            &settings.failover,
            datapath.clone(),
            events,
        )
        .await?;
        tracing::info!(uplinks = settings.uplinks.len(), "uplinks managed");
        Some(u)
    };
    let held = Held {
        config: config.to_owned(),
        signers: Default::default(),
        readable: parking_lot::Mutex::new(readable(config, &settings)),
        settings,
        datapath,
        uplinks,
        web_proxies,
        _lock: lock,
    };
    Ok((held, tun, tun_offload))
}

/// The files vpnd may read: `config` and the files `settings` names that
/// it reads while it serves. Never the TLS key.
fn readable(config: &Path, settings: &Settings) -> Vec<std::path::PathBuf> {
    let mut files = vec![config.to_owned(), settings.auth.users_file.clone()];
    files.extend(settings.tls.client_crl_file.clone());
    files.extend(settings.ldap.as_ref().map(|l| l.ca_file.clone()));
    files.retain(|f| Some(f) != settings.tls.key_file.as_ref());
    files
}

/// Answers a file request of vpnd's (`crate::files`): only the files the
/// configuration names, read, and the saved sessions' file, written.
fn file(held: &Held, req: Request) -> Reply {
    use base64::Engine as _;
    let io = |e: std::io::Error| Reply::Io {
        errno: e.raw_os_error(),
        message: e.to_string(),
    };
    let refused = |path: &Path, what: &str| Reply::Io {
        errno: Some(libc::EACCES),
        message: format!(
            "{}: not a file the configuration lets vpnd {what}",
            path.display()
        ),
    };
    match req {
        Request::ReadFile { path } => {
            if !held.readable.lock().contains(&path) {
                return refused(&path, "read");
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => return io(e),
            };
            if path == held.config {
                // A reload: what the new file names may be read next.
                if let Ok(text) = std::str::from_utf8(&bytes)
                    && let Ok(new) = Config::parse(text, &path)
                {
                    *held.readable.lock() = readable(&held.config, &new);
                }
            }
            Reply::File(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Request::FileModified { path } => {
            if !held.readable.lock().contains(&path) {
                return refused(&path, "read");
            }
            match std::fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(t) => Reply::Modified(t),
                Err(e) => io(e),
            }
        }
        Request::WriteFile { path, data } => {
            if path != crate::session::persist::path(&held.settings.server.state_dir) {
                return refused(&path, "write");
            }
            match base64::engine::general_purpose::STANDARD.decode(data) {
                Ok(bytes) => match crate::files::write_private_here(&path, &bytes) {
                    Ok(()) => Reply::Done,
                    Err(e) => io(e),
                },
                Err(e) => Reply::Failed(format!("not base64: {e}")),
            }
        }
        _ => Reply::Failed("not a file request".into()),
    }
}

/// Starts a key signer for vpnd (the key the configuration names; never
/// generating one), reaping those that ended.
fn start_key_signer(held: &Held) -> anyhow::Result<(u32, UnixStream)> {
    let mut signers = held.signers.lock();
    signers.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    if signers.len() >= MAX_SIGNERS {
        bail!("{MAX_SIGNERS} key signers started for vpnd still run");
    }
    let (mut spawn, _) = crate::transport::tls::signer_spawn(&held.settings);
    spawn.generate = None;
    let (child, stream) = spawn.start_detached()?;
    let pid = child.id();
    signers.push(child);
    tracing::info!(pid, "broker: started a key signer for vpnd");
    Ok((pid, stream))
}

/// `server.state_dir/broker.lock`, held for the broker's life; waits a
/// while for a broker that is still going away.
fn lock(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating server.state_dir {}", state_dir.display()))?;
    let path = state_dir.join("broker.lock");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let until = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a file we hold open.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        if std::time::Instant::now() >= until {
            bail!(
                "{} is held by another vpnd broker after {LOCK_WAIT:?}: is another vpnd running with server.state_dir {}?",
                path.display(),
                state_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Set up: keep only what maps and uplinks take.
fn drop_privileges() {
    use crate::privileges::{broker_needs, drop_all_but};
    match drop_all_but(broker_needs(), Duration::from_secs(2)) {
        Ok(d) => tracing::info!(kept = %d.kept, "broker: capabilities: kept {}", d.kept),
        Err(e) => tracing::error!("broker: capabilities not dropped: {e}"),
    }
    if let Err(e) = crate::privileges::forbid_system_calls() {
        tracing::error!("broker: seccomp filter not applied: {e}");
    }
}

/// Answers one request.
fn answer(held: &Held, req: Request) -> Reply {
    let done = |r: Result<(), crate::datapath::bpf::MapWriteError>| match r {
        Ok(()) => Reply::Done,
        Err(e) => Reply::Failed(e.to_string()),
    };
    let slots = |start: u32, end: u32| {
        if start > end || end - start > MAX_SLOTS {
            Err(Reply::Failed(format!(
                "rule slots {start}..{end}: at most {MAX_SLOTS} at once"
            )))
        } else {
            Ok(start..end)
        }
    };
    if matches!(
        req,
        Request::ReadFile { .. } | Request::FileModified { .. } | Request::WriteFile { .. }
    ) {
        return file(held, req);
    }
    let mut dp = held.datapath.lock();
    match req {
        Request::AddSession { ip, info, from } => {
            done(dp.add_session_counting_from(ip, info, from))
        }
        Request::RemoveSession { ip } => Reply::Stats(dp.remove_session(ip)),
        Request::SetSession { ip, info } => done(dp.set_session(ip, info)),
        Request::AllSessionStats => Reply::Snapshot(dp.all_session_stats().entries()),
        Request::ForgetRateState { session_id } => {
            dp.forget_rate_state(session_id);
            Reply::Done
        }
        Request::InstallPolicy {
            id,
            info,
            compiled,
            first_interval,
        } => done(dp.install_policy(id, info, &compiled, first_interval)),
        Request::RemovePolicy { id, compiled } => {
            dp.remove_policy(id, &compiled);
            Reply::Done
        }
        Request::ResetHits { start, end } => match slots(start, end) {
            Ok(r) => done(dp.reset_hits(r)),
            Err(e) => e,
        },
        Request::RuleHits { start, end } => match slots(start, end) {
            Ok(r) => Reply::Counts(r.map(|s| dp.rule_hits(s)).collect()),
            Err(e) => e,
        },
        Request::Drops => Reply::Counts(dp.drops().into_iter().map(|(_, n)| n).collect()),
        Request::GuardDrops => {
            Reply::Counts(dp.guard_drops().into_iter().map(|(_, n)| n).collect())
        }
        Request::Ban { net, time } => done(dp.ban(net, time)),
        Request::Unban { net } => {
            dp.unban(net);
            Reply::Done
        }
        Request::Uplinks => {
            drop(dp);
            Reply::Uplinks(held.uplinks.as_ref().map(|u| u.rows()).unwrap_or_default())
        }
        Request::WebProxies => {
            drop(dp);
            Reply::WebProxies(
                held.web_proxies
                    .as_ref()
                    .map(|w| w.rows())
                    .unwrap_or_default(),
            )
        }
        Request::Stop
        | Request::StartKeySigner
        | Request::ReadFile { .. }
        | Request::FileModified { .. }
        | Request::WriteFile { .. } => Reply::Failed("not a map request".into()),
    }
}

/// The clean stop: what vpnd's own shutdown used to remove.
async fn tear_down(held: &Held) {
    held.datapath.lock().unpin();
    if let Err(e) = crate::net::uplinks::cleanup(&held.settings.failover).await {
        tracing::error!("removing uplink state: {e:#}");
    }
    if let Err(e) = crate::net::web_proxy::cleanup(&held.settings.failover).await {
        tracing::error!("removing web proxy routes: {e:#}");
    }
    let _ = std::fs::remove_file(&held.settings.server.control_socket);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vpnd_may_read_what_the_config_names_and_never_the_key() {
        let parse = |text: &str| {
            let text = format!("[tunnel]\npool_v4 = \"198.19.0.0/24\"\n{text}");
            Config::parse(&text, Path::new("/etc/vpn/vpnd.toml")).unwrap()
        };
        let s = parse(
            "[auth]\nusers_file = \"/etc/vpn/users.toml\"\n\
             [tls]\ncert_file = \"/etc/vpn/cert.pem\"\nkey_file = \"/etc/vpn/key.pem\"\n",
        );
        let r = readable(Path::new("/etc/vpn/vpnd.toml"), &s);
        assert_eq!(
            r,
            [
                std::path::PathBuf::from("/etc/vpn/vpnd.toml"),
                "/etc/vpn/users.toml".into()
            ]
        );
        // A users file that is the key is not read for vpnd.
        let s = parse(
            "[auth]\nusers_file = \"/etc/vpn/key.pem\"\n\
             [tls]\ncert_file = \"/etc/vpn/cert.pem\"\nkey_file = \"/etc/vpn/key.pem\"\n",
        );
        let r = readable(Path::new("/etc/vpn/vpnd.toml"), &s);
        assert_eq!(r, [std::path::PathBuf::from("/etc/vpn/vpnd.toml")]);
    }
}
