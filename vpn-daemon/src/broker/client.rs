//! vpnd's side of the broker: starting it, and asking it.

use std::{
    net::IpAddr,
    ops::Range,
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use parking_lot::Mutex;
use vpn_common::{DropReason, GuardDrop, PolicyInfo, SessionInfo, SessionStats};

use super::{
    ARG, MAX_QUEUES, OffloadOff, Reply, Request, Setup, read_frame, recv_fds, write_frame,
};
use crate::{
    api::UplinkRow,
    datapath::{
        DatapathOps,
        bpf::{MapWriteError, StatsSnapshot},
        offloads::Off,
        tun::Tun,
    },
    policy::Compiled,
};

/// How long the broker may take to set up (loading the BPF programs,
/// the uplinks' first netlink work).
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running broker.
pub struct Broker {
    link: Mutex<Link>,
    /// Set before the clean stop, so that the broker's exit is expected.
    stopping: Arc<AtomicBool>,
    pid: u32,
}

struct Link {
    stream: UnixStream,
    /// Why the link is unusable (a request timed out or the broker
    /// went): requests fail at once with it.
    broken: Option<String>,
}

impl Link {
    /// Sends `req` and reads the reply (a refusal as the error).
    fn exchange(&mut self, req: &Request) -> Result<Reply, String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        let answer = write_frame(&mut self.stream, req).and_then(|()| read_frame(&mut self.stream));
        let why = match answer {
            Ok(Some(Reply::Failed(e))) => return Err(e),
            Ok(Some(r)) => return Ok(r),
            Ok(None) => "the broker has gone".to_owned(),
            // A late reply would answer the next request: the link is done.
            Err(e) => format!("the broker did not answer: {e}"),
        };
        self.broken = Some(why.clone());
        Err(why)
    }
}

/// What [`Broker::start`] gives vpnd.
pub struct Started {
    pub broker: Arc<Broker>,
    /// The TUN device's queues.
    pub tun: Tun,
    /// Whether the device offers TSO (`datapath/offloads.rs`).
    pub tun_offload: Result<(), Off>,
}

impl Broker {
    /// Starts `vpnd --broker CONFIG` and waits until it has set up.
    pub fn start(config: &Path) -> anyhow::Result<Started> {
        let (ours, theirs) = UnixStream::pair().context("a socket pair for the broker")?;
        let exe = std::env::current_exe().context("finding vpnd's own executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg(ARG)
            .arg(config)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe. The broker dies with the
        // thread that started it: vpnd's main thread, which lives as long
        // as vpnd.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting the broker")?;
        let mut stream = ours;
        stream.set_read_timeout(Some(SETUP_TIMEOUT))?;
        let setup = recv_fds(&stream, MAX_QUEUES)
            .and_then(|fds| read_frame::<Setup>(&mut stream).map(|s| (fds, s)));
        let (fds, setup) = match setup {
            Ok((fds, Some(s))) => (fds, s),
            Ok((_, None)) | Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!(
                    "the broker did not set up{}",
                    status.map_or(String::new(), |s| format!(" (it exited: {s})"))
                );
            }
        };
        let (tun, tun_offload) = match setup {
            Setup::Ready { tun, tun_offload } => (tun, tun_offload),
            Setup::Failed(e) => {
                let _ = child.wait();
                return Err(anyhow!(e));
            }
        };
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let tun = Tun::from_queues(&tun, fds.into_iter().map(std::fs::File::from).collect())
            .context("the broker's TUN queues")?;
        let tun_offload = match tun_offload {
            None => Ok(()),
            Some(OffloadOff::Configured) => Err(Off::Configured),
            Some(OffloadOff::Kernel(e)) => Err(Off::Kernel(std::io::Error::other(e))),
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let pid = child.id();
        // vpnd without its broker has no data path: it goes, and its
        // service manager starts it again.
        let expected = stopping.clone();
        std::thread::Builder::new()
            .name("broker-watch".into())
            .spawn(move || {
                let status = child.wait();
                if !expected.load(Ordering::SeqCst) {
                    tracing::error!(
                        "the broker exited ({}): vpnd cannot serve without it, exiting",
                        status.map_or_else(|e| e.to_string(), |s| s.to_string())
                    );
                    std::process::exit(1);
                }
            })
            .context("a thread to watch the broker")?;
        let broker = Arc::new(Broker {
            link: Mutex::new(Link {
                stream,
                broken: None,
            }),
            stopping,
            pid,
        });
        Ok(Started {
            broker,
            tun,
            tun_offload,
        })
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// One request and its reply.
    fn call(&self, req: &Request) -> Result<Reply, String> {
        self.link.lock().exchange(req)
    }

    fn done(&self, req: &Request) -> Result<(), String> {
        match self.call(req)? {
            Reply::Done => Ok(()),
            other => Err(format!("the broker answered {other:?}")),
        }
    }

    /// The web proxies' state (`vpnctl web-proxies`, metrics); none when
    /// the broker cannot say.
    pub fn web_proxies(&self) -> Vec<crate::api::WebProxyRow> {
        match self.call(&Request::WebProxies) {
            Ok(Reply::WebProxies(rows)) => rows,
            Ok(other) => {
                tracing::error!("broker: web proxies answered with {other:?}");
                Vec::new()
            }
            Err(e) => {
                tracing::error!("broker: web proxies: {e}");
                Vec::new()
            }
        }
    }

    /// The uplinks' state (`vpnctl uplinks`, metrics); none when the broker
    /// cannot say.
    pub fn uplinks(&self) -> Vec<UplinkRow> {
        match self.call(&Request::Uplinks) {
            Ok(Reply::Uplinks(rows)) => rows,
            Ok(other) => {
                tracing::error!("broker: uplinks answered with {other:?}");
                Vec::new()
            }
            Err(e) => {
                tracing::error!("broker: uplinks: {e}");
                Vec::new()
            }
        }
    }

    /// A new key signer, started by the broker: the socket to it and its
    /// pid.
    pub fn start_key_signer(&self) -> anyhow::Result<(UnixStream, u32)> {
        // The socket follows the reply: the link stays ours until it came.
        let mut link = self.link.lock();
        let pid = match link.exchange(&Request::StartKeySigner) {
            Ok(Reply::KeySigner { pid }) => pid,
            Ok(other) => bail!("the broker answered {other:?}"),
            Err(e) => bail!("the broker could not start a key signer: {e}"),
        };
        let fd = recv_fds(&link.stream, 1)
            .ok()
            .and_then(|fds| fds.into_iter().next());
        match fd {
            Some(fd) => Ok((UnixStream::from(fd), pid)),
            None => {
                link.broken = Some("the broker sent no key signer socket".into());
                bail!("the broker sent no key signer socket")
            }
        }
    }

    /// The clean stop: the broker removes what it set up and exits.
    pub fn stop(&self) -> Result<(), String> {
        self.stopping.store(true, Ordering::SeqCst);
        self.done(&Request::Stop)
    }
}

/// The data path's maps, in the broker.
pub struct RemoteDatapath(pub Arc<Broker>);

impl RemoteDatapath {
    fn write(&self, req: &Request) -> Result<(), MapWriteError> {
        self.0.done(req).map_err(MapWriteError::Broker)
    }

    fn counts(&self, req: &Request, n: usize) -> Vec<u64> {
        match self.0.call(req) {
            Ok(Reply::Counts(c)) if c.len() == n => c,
            Ok(other) => {
                tracing::error!("broker: {req:?} answered with {other:?}");
                vec![0; n]
            }
            Err(e) => {
                tracing::error!("broker: {req:?}: {e}");
                vec![0; n]
            }
        }
    }
}

impl DatapathOps for RemoteDatapath {
    fn add_session_counting_from(
        &mut self,
        ip: IpAddr,
        info: SessionInfo,
        from: SessionStats,
    ) -> Result<(), MapWriteError> {
        self.write(&Request::AddSession { ip, info, from })
    }

    fn remove_session(&mut self, ip: IpAddr) -> SessionStats {
        match self.0.call(&Request::RemoveSession { ip }) {
            Ok(Reply::Stats(s)) => s,
            other => {
                tracing::error!("broker: removing session {ip}: {other:?}");
                SessionStats::default()
            }
        }
    }

    fn set_session(&mut self, ip: IpAddr, info: SessionInfo) -> Result<(), MapWriteError> {
        self.write(&Request::SetSession { ip, info })
    }

    fn all_session_stats(&self) -> StatsSnapshot {
        match self.0.call(&Request::AllSessionStats) {
            Ok(Reply::Snapshot(entries)) => StatsSnapshot::from_entries(entries),
            other => {
                tracing::error!("broker: session counters: {other:?}");
                StatsSnapshot::default()
            }
        }
    }

    fn forget_rate_state(&mut self, session_id: u64) {
        if let Err(e) = self.0.done(&Request::ForgetRateState { session_id }) {
            tracing::error!("broker: forgetting rate state of session {session_id}: {e}");
        }
    }

    fn install_policy(
        &mut self,
        id: u32,
        info: PolicyInfo,
        c: &Compiled,
        first_interval: u32,
    ) -> Result<(), MapWriteError> {
        self.write(&Request::InstallPolicy {
            id,
            info,
            compiled: c.clone(),
            first_interval,
        })
    }

    fn remove_policy(&mut self, id: u32, c: &Compiled) {
        let req = Request::RemovePolicy {
            id,
            compiled: c.clone(),
        };
        if let Err(e) = self.0.done(&req) {
            tracing::error!("broker: removing policy id {id}: {e}");
        }
    }

    fn reset_hits(&mut self, slots: Range<u32>) -> Result<(), MapWriteError> {
        self.write(&Request::ResetHits {
            start: slots.start,
            end: slots.end,
        })
    }

    fn rule_hits(&self, slots: Range<u32>) -> Vec<u64> {
        let n = slots.len();
        self.counts(
            &Request::RuleHits {
                start: slots.start,
                end: slots.end,
            },
            n,
        )
    }

    fn drops(&self) -> Vec<(DropReason, u64)> {
        let c = self.counts(&Request::Drops, DropReason::ALL.len());
        DropReason::ALL.iter().copied().zip(c).collect()
    }

    fn guard_drops(&self) -> Vec<(GuardDrop, u64)> {
        let c = self.counts(&Request::GuardDrops, GuardDrop::ALL.len());
        GuardDrop::ALL.iter().copied().zip(c).collect()
    }

    fn ban(&mut self, net: ipnet::IpNet, time: Option<Duration>) -> Result<(), MapWriteError> {
        self.write(&Request::Ban { net, time })
    }

    fn unban(&mut self, net: ipnet::IpNet) {
        if let Err(e) = self.0.done(&Request::Unban { net }) {
            tracing::error!("broker: lifting the ban of {net}: {e}");
        }
    }
}

/// Files reached through the broker once vpnd serves as `nobody`
/// (`crate::files`).
pub struct BrokerFiles(pub Arc<Broker>);

impl BrokerFiles {
    fn ask(&self, req: &Request) -> std::io::Result<Reply> {
        match self.0.call(req) {
            Ok(Reply::Io { errno, message }) => Err(match errno {
                Some(n) => {
                    let e = std::io::Error::from_raw_os_error(n);
                    std::io::Error::new(e.kind(), format!("{message} (the broker: {e})"))
                }
                None => std::io::Error::other(message),
            }),
            Ok(r) => Ok(r),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

impl crate::files::Access for BrokerFiles {
    fn read(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
        use base64::Engine as _;
        match self.ask(&Request::ReadFile {
            path: path.to_owned(),
        })? {
            Reply::File(b) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(std::io::Error::other),
            other => Err(std::io::Error::other(format!(
                "the broker answered {other:?}"
            ))),
        }
    }

    fn modified(&self, path: &std::path::Path) -> std::io::Result<std::time::SystemTime> {
        match self.ask(&Request::FileModified {
            path: path.to_owned(),
        })? {
            Reply::Modified(t) => Ok(t),
            other => Err(std::io::Error::other(format!(
                "the broker answered {other:?}"
            ))),
        }
    }

    fn write_private(&self, path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
        use base64::Engine as _;
        match self.ask(&Request::WriteFile {
            path: path.to_owned(),
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        })? {
            Reply::Done => Ok(()),
            other => Err(std::io::Error::other(format!(
                "the broker answered {other:?}"
            ))),
        }
    }
}
