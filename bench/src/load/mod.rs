//! The protocol load generator (`vpn-bench load`): N simulated AnyConnect
//! clients ([`peer`]) from many source addresses, started at a fixed rate,
//! held with keepalives (and optional echoes through the tunnel) until a
//! common end, then disconnected; everything bounded by a hard time limit.
//! Prints one JSON report on stdout: logins per second, login and set-up
//! latency quantiles, failures by reason, sessions held, and the gateway's
//! memory and CPU sampled over time (any gateway: vpnd or ocserv, whose
//! process tree is summed).

pub mod dtls;
pub mod peer;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use peer::{Failure, Hold, LoginTimes, Target, TunnelCounters};

/// `vpn-bench load` options.
#[derive(clap::Parser, Debug, Clone)]
pub struct Options {
    /// The gateway's TLS address.
    #[arg(long)]
    pub target: SocketAddr,
    /// Source addresses to spread the clients over (round robin); each
    /// must be an address of the namespace the generator runs in.
    #[arg(long, value_delimiter = ',', required = true)]
    pub sources: Vec<IpAddr>,
    /// Sessions to open.
    #[arg(long)]
    pub sessions: usize,
    /// Logins started per second.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Logins in flight at most (a client waits for its turn).
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Seconds every session stays up after the last one is due.
    #[arg(long, default_value_t = 10)]
    pub hold: u64,
    /// Hard bound on the whole run, in seconds.
    #[arg(long, default_value_t = 120)]
    pub limit: u64,
    /// User names are PREFIX0, PREFIX1, ... up to --users (wrapping).
    #[arg(long, default_value = "load")]
    pub user_prefix: String,
    #[arg(long, default_value_t = 1)]
    pub users: usize,
    #[arg(long)]
    pub password: String,
    /// Seconds between keepalives (or the gateway's, if shorter).
    #[arg(long, default_value_t = 20)]
    pub keepalive: u64,
    /// An ICMP echo to this address through each tunnel every --echo-every
    /// seconds.
    #[arg(long)]
    pub echo: Option<Ipv4Addr>,
    #[arg(long, default_value_t = 10)]
    pub echo_every: u64,
    /// The gateway's process (its whole tree is summed) to sample.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Seconds between samples of the gateway.
    #[arg(long, default_value_t = 2)]
    pub sample_every: u64,
    /// Seconds one step (connect, handshake, a request) may take.
    #[arg(long, default_value_t = 30)]
    pub step_timeout: u64,
    /// No new client starts while the machine has less memory available
    /// than this (MiB): a gateway that forks per client must not take the
    /// machine down; such clients count as `memory_guard` failures.
    #[arg(long, default_value_t = 1024)]
    pub min_available_mib: u64,
    /// Open a DTLS channel per session too (PSK-NEGOTIATE), and send
    /// keepalives, DPD answers and echoes over it.
    #[arg(long)]
    pub dtls: bool,
    /// Churn (the soak): each session lives 0.5 to 1.5 times this many
    /// seconds, then ends, and its client logs in again, until the hold
    /// ends. One ending in five vanishes (closes without DISCONNECT, as a
    /// client that lost its network). 0 = every session lasts the run.
    #[arg(long, default_value_t = 0)]
    pub churn: u64,
}

/// MemAvailable from /proc/meminfo, in MiB.
fn available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib / 1024)
}

/// One sample of the gateway and the generator.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    pub held: usize,
    pub logins_ok: u64,
    /// Proportional set size of the gateway's processes, KiB.
    pub pss_kib: u64,
    /// Resident set of the gateway's processes, KiB.
    pub rss_kib: u64,
    pub processes: usize,
    /// CPU seconds (user + system) of the gateway's processes so far.
    pub cpu_s: f64,
    /// Open descriptors of the gateway's processes.
    pub fds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles {
            p50: 0.0,
            p99: 0.0,
            max: 0.0,
        };
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Quantiles {
        p50: at(0.5),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sessions: usize,
    pub logins_ok: u64,
    /// Logins completed per second, from the first start to the last
    /// success.
    pub logins_per_s: f64,
    pub login_ms: Quantiles,
    /// TLS, first form and CONNECT: the gateway's set-up work without the
    /// password check.
    pub setup_ms: Quantiles,
    pub tls_ms: Quantiles,
    pub password_ms: Quantiles,
    pub connect_ms: Quantiles,
    /// DTLS handshakes (with --dtls): how many completed, and how long.
    pub dtls_up: usize,
    pub dtls_ms: Quantiles,
    /// Records that came over DTLS.
    pub dtls_received: u64,
    pub failures: BTreeMap<Failure, u64>,
    pub held_max: usize,
    /// Sessions up when the hold began and when it ended.
    pub held_at_hold_start: usize,
    pub held_at_hold_end: usize,
    pub hold_s: f64,
    pub keepalives: u64,
    pub dpd_answered: u64,
    pub echo_sent: u64,
    pub echo_received: u64,
    /// With --churn: sessions that ended and were followed by a new
    /// login, and endings without DISCONNECT.
    pub relogins: u64,
    pub vanished: u64,
    pub samples: Vec<Sample>,
    /// Set by the caller: the run ended at its time limit.
    pub hit_limit: bool,
}

#[derive(Default)]
struct Shared {
    held: AtomicUsize,
    held_max: AtomicUsize,
    ok: AtomicU64,
    last_ok_ms: AtomicU64,
    times: Mutex<Vec<LoginTimes>>,
    relogins: AtomicU64,
    vanished: AtomicU64,
    failures: Mutex<BTreeMap<Failure, u64>>,
    counters: TunnelCounters,
}

impl Shared {
    fn fail(&self, f: Failure) {
        *self.failures.lock().entry(f).or_default() += 1;
    }
}

/// The TLS client config: a load generator does not check the gateway's
/// certificate (the benchmark made it; openconnect would pin it).
fn tls_config() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the defaults")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(provider)))
        .with_no_client_auth();
    Arc::new(cfg)
}

/// Runs the load as `opts` say and returns its report.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    if opts.sessions == 0 || opts.rate <= 0.0 || opts.users == 0 {
        bail!("--sessions, --rate and --users must be above 0");
    }
    // A TCP socket per session, a UDP one more with DTLS.
    let want = opts.sessions as u64 * if opts.dtls { 2 } else { 1 } + 1024;
    let got = raise_nofile(want);
    if got < want {
        eprintln!(
            "vpn-bench load: descriptor limit {got}, below the {want} this run needs; \
             sessions beyond it fail as generator_descriptors"
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(drive(opts.clone()))
}

/// Lifts the descriptor limit to `want`: the hard limit too when allowed
/// (root with CAP_SYS_RESOURCE), else the soft one up to the hard one.
/// Children inherit it. Returns the soft limit now.
pub fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur >= want {
            return r.rlim_cur;
        }
        let both = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &both) == 0 {
            return want;
        }
        r.rlim_cur = want.min(r.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

async fn drive(opts: Options) -> anyhow::Result<Report> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(opts.limit);
    let ramp = Duration::from_secs_f64(opts.sessions as f64 / opts.rate);
    let hold_start = start + ramp;
    let hold_end = (hold_start + Duration::from_secs(opts.hold)).min(deadline);
    let target = Arc::new(Target {
        addr: opts.target,
        tls: tls_config(),
        step_timeout: Duration::from_secs(opts.step_timeout),
        dtls: if opts.dtls {
            Some(dtls::Client::new()?)
        } else {
            None
        },
    });
    let shared = Arc::new(Shared::default());
    let hold = Arc::new(Hold {
        until: hold_end,
        keepalive: Duration::from_secs(opts.keepalive),
        echo: opts.echo.map(|a| (a, Duration::from_secs(opts.echo_every))),
        vanish: false,
    });
    let churn = Duration::from_secs(opts.churn);
    let gate = Arc::new(tokio::sync::Semaphore::new(opts.in_flight));

    let sampler = {
        let shared = shared.clone();
        let every = Duration::from_secs(opts.sample_every.max(1));
        let pid = opts.gateway_pid;
        tokio::spawn(async move {
            let mut out: Vec<Sample> = Vec::new();
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let ((pss, rss, n, mut cpu), fds) = match pid {
                    Some(p) => tokio::task::spawn_blocking(move || (gateway_usage(p), open_fds(p)))
                        .await
                        .unwrap_or_default(),
                    None => Default::default(),
                };
                // CPU time only grows: a sample that could not read it
                // keeps the last one's.
                if let Some(last) = out.last() {
                    cpu = cpu.max(last.cpu_s);
                }
                out.push(Sample {
                    t: start.elapsed().as_secs_f64(),
                    held: shared.held.load(Relaxed),
                    logins_ok: shared.ok.load(Relaxed),
                    pss_kib: pss,
                    rss_kib: rss,
                    processes: n,
                    cpu_s: cpu,
                    fds,
                });
                if Instant::now() >= hold_end + Duration::from_secs(2) {
                    return out;
                }
            }
        })
    };
    let held_at_start = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(hold_start.min(hold_end)).await;
            let a = shared.held.load(Relaxed);
            tokio::time::sleep_until(hold_end - Duration::from_millis(200).min(hold_end - start))
                .await;
            (a, shared.held.load(Relaxed))
        })
    };

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.sessions {
        let due = start + Duration::from_secs_f64(i as f64 / opts.rate);
        if due >= deadline {
            shared.fail(Failure::Deadline);
            continue;
        }
        tokio::time::sleep_until(due).await;
        if i % 16 == 0 && available_mib() < opts.min_available_mib {
            shared.fail(Failure::MemoryGuard);
            continue;
        }
        let (target, shared, hold, gate) =
            (target.clone(), shared.clone(), hold.clone(), gate.clone());
        let source = opts.sources[i % opts.sources.len()];
        let user = format!("{}{}", opts.user_prefix, i % opts.users);
        let password = opts.password.clone();
        tasks.spawn(async move {
            let mut round = 0u64;
            loop {
                let permit = tokio::select! {
                    p = gate.clone().acquire_owned() => p.expect("never closed"),
                    _ = tokio::time::sleep_until(deadline) => return shared.fail(Failure::Deadline),
                };
                let login = tokio::select! {
                    r = peer::login(&target, source, &user, &password) => r,
                    _ = tokio::time::sleep_until(deadline) => Err(Failure::Deadline),
                };
                drop(permit);
                let tunnel = match login {
                    Ok((tunnel, times)) => {
                        shared.ok.fetch_add(1, Relaxed);
                        shared
                            .last_ok_ms
                            .fetch_max(start.elapsed().as_millis() as u64, Relaxed);
                        shared.times.lock().push(times);
                        tunnel
                    }
                    Err(f) => {
                        shared.fail(f);
                        if churn.is_zero() || Instant::now() + Duration::from_secs(5) >= hold_end {
                            return;
                        }
                        // Churn goes on: this client tries again shortly.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let n = shared.held.fetch_add(1, Relaxed) + 1;
                shared.held_max.fetch_max(n, Relaxed);
                let mine;
                let h = if churn.is_zero() {
                    &*hold
                } else {
                    // A life of 0.5 to 1.5 churns, spread by a hash of
                    // the client and its round; every fifth ending
                    // vanishes.
                    let spread = (i as u64)
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(round * 40_503)
                        % 1000;
                    let life = churn.mul_f64(0.5 + spread as f64 / 1000.0);
                    let until = (Instant::now() + life).min(hold.until);
                    mine = Hold {
                        until,
                        keepalive: hold.keepalive,
                        echo: hold.echo,
                        vanish: until < hold.until && (i as u64 + round).is_multiple_of(5),
                    };
                    &mine
                };
                let r = tunnel.hold(h, &shared.counters).await;
                shared.held.fetch_sub(1, Relaxed);
                if let Err(f) = r {
                    shared.fail(f);
                }
                if churn.is_zero() || Instant::now() + Duration::from_secs(5) >= hold_end {
                    return;
                }
                if h.vanish {
                    shared.vanished.fetch_add(1, Relaxed);
                }
                shared.relogins.fetch_add(1, Relaxed);
                round += 1;
            }
        });
    }
    // Every session ends at hold_end; a stuck one at the deadline.
    let _ = tokio::time::timeout_at(deadline + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let samples = sampler.await.unwrap_or_default();
    let (held_at_hold_start, held_at_hold_end) = held_at_start.await.unwrap_or_default();

    let times = std::mem::take(&mut *shared.times.lock());
    let ms = |f: &dyn Fn(&LoginTimes) -> Duration| {
        quantiles(times.iter().map(|t| f(t).as_secs_f64() * 1e3).collect())
    };
    let ok = shared.ok.load(Relaxed);
    let last_ok = shared.last_ok_ms.load(Relaxed) as f64 / 1e3;
    let c = &shared.counters;
    Ok(Report {
        sessions: opts.sessions,
        logins_ok: ok,
        logins_per_s: if last_ok > 0.0 {
            ok as f64 / last_ok
        } else {
            0.0
        },
        login_ms: ms(&|t| t.total),
        setup_ms: ms(&|t| t.setup()),
        tls_ms: ms(&|t| t.tls),
        password_ms: ms(&|t| t.password),
        connect_ms: ms(&|t| t.connect),
        dtls_up: times.iter().filter(|t| t.dtls.is_some()).count(),
        dtls_ms: quantiles(
            times
                .iter()
                .filter_map(|t| Some(t.dtls?.as_secs_f64() * 1e3))
                .collect(),
        ),
        dtls_received: c.dtls_received.load(Relaxed),
        failures: shared.failures.lock().clone(),
        held_max: shared.held_max.load(Relaxed),
        held_at_hold_start,
        held_at_hold_end,
        hold_s: (hold_end - hold_start.min(hold_end)).as_secs_f64(),
        keepalives: c.keepalives.load(Relaxed),
        dpd_answered: c.dpd_answered.load(Relaxed),
        echo_sent: c.echo_sent.load(Relaxed),
        echo_received: c.echo_received.load(Relaxed),
        relogins: shared.relogins.load(Relaxed),
        vanished: shared.vanished.load(Relaxed),
        samples,
        hit_limit: Instant::now() >= deadline,
    })
}

/// Open descriptors of `root` and its descendants.
pub fn open_fds(root: u32) -> usize {
    process_tree(root)
        .iter()
        .map(|(p, _)| std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count()))
        .sum()
}

/// `root` and all its descendants, each with its CPU clock ticks (utime
/// + stime) so far.
pub fn process_tree(root: u32) -> Vec<(u32, u64)> {
    let stat = |pid: u32| -> Option<(u32, u32, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the ")" of the command name.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((pid, ppid, ticks))
    };
    let procs: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect();
    // The root's own file, read directly: a walk of /proc while processes
    // come and go can miss an entry (a sample of 0 CPU seconds, seen in a
    // 10,000-session run).
    let root_ticks = stat(root).map_or(0, |s| s.2);
    let mut tree = vec![(root, root_ticks)];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i].0;
        tree.extend(
            procs
                .iter()
                .filter(|(_, pp, _)| *pp == p)
                .map(|&(c, _, t)| (c, t)),
        );
        i += 1;
    }
    tree
}

/// PSS and RSS (KiB), process count and CPU seconds of `root` and all its
/// descendants.
pub fn gateway_usage(root: u32) -> (u64, u64, usize, f64) {
    let tree = process_tree(root);
    let (mut pss, mut rss, mut ticks) = (0, 0, 0);
    for &(p, t) in &tree {
        ticks += t;
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")) {
            let kib = |name: &str| {
                s.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            pss += kib("Pss:");
            rss += kib("Rss:");
        }
    }
    (
        pss,
        rss,
        tree.len(),
        ticks as f64 / crate::tunnel::ticks_per_sec(),
    )
}
