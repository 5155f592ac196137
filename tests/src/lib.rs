//! Test topology helpers: network namespaces, a real `vpnd` and the real
//! openconnect client.
//!
//! Every topology is built from namespaces this process creates, with unique
//! names, and removed on drop (also when a test fails). Addresses are from
//! 198.18.0.0/15 and fd00::/8 only:
//!
//! ```text
//!  client ns               gateway ns                   server ns
//!  198.18.1.2/24 ---- 198.18.1.1/24 | 198.18.2.1/24 ---- 198.18.2.2/24
//!                       vpn0: 198.19.0.1/24                fd00:2::2/64
//!                       pool 198.19.0.0/24, fd00:1::/64
//! ```
//!
//! Processes are stopped by PID, never by name.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod certs;
pub mod ldap;
pub mod packets;
pub mod radius;

use anyhow::{Context as _, anyhow, bail, ensure};

pub const GW_OUTSIDE: &str = "198.18.1.1";
pub const CLIENT_OUTSIDE: &str = "198.18.1.2";
pub const GW_INSIDE: &str = "198.18.2.1";
pub const SERVER: &str = "198.18.2.2";
pub const SERVER6: &str = "fd00:2::2";
pub const SERVER_NET: &str = "198.18.2.0/24";
pub const POOL: &str = "198.19.0.0/24";
pub const POOL6: &str = "fd00:1::/64";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique id for names: pid and a per-process counter.
pub fn unique_id() -> String {
    format!(
        "{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Held by tests that measure throughput or loss under load, so two of them
/// in one test binary never run at once: on a 2-core machine each would
/// measure the other (two DTLS downloads at once drop client datagrams
/// that one alone does not).
pub fn load_test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fails unless running as root: the tests need namespaces, TUN and BPF.
pub fn require_root() {
    assert!(
        // SAFETY: geteuid cannot fail and touches no memory.
        unsafe { libc::geteuid() } == 0,
        "integration tests need root (network namespaces, TUN, BPF); run `cargo xtask test` as root"
    );
}

/// The `q` quantile of sorted `t` (0 when empty).
pub fn quantile(t: &[f64], q: f64) -> f64 {
    if t.is_empty() {
        return 0.0;
    }
    t[((t.len() - 1) as f64 * q).round() as usize]
}

/// Runs a command to completion, failing with its output if it fails.
pub fn sh(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Directory holding the built binaries (`vpnd`, `vpnctl`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VPN_GATEWAY_BIN_DIR") {
        return d.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// How many times slower than a real CPU this machine runs the tests:
/// `VPN_TEST_SLOWDOWN`, which `cargo xtask vm-test` sets when QEMU emulates
/// the CPU (TCG, about 5); 1 otherwise. Tests whose steps race a clock
/// (a load generator's ramp) scale by it; checks of speed itself go
/// through [`assert_at_speed!`].
pub fn slowdown() -> u32 {
    std::env::var("VPN_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// What a speed check that failed on a slowed CPU prints; `cargo xtask`
/// counts these lines in its summary.
pub const SPEED_UNMET_MARK: &str = "vpn-tests: speed check not met on a slowed CPU: ";

/// Asserts a property that depends on the machine's speed (a window that
/// fills, reads that batch, a wait under a bound). On a real CPU it is an
/// assertion. Where [`slowdown`] is above 1, the gateway cannot reach the
/// speeds the property needs (an emulated CPU moves 20 Mbit/s where this
/// host moves hundreds): a failure is reported on stderr with
/// [`SPEED_UNMET_MARK`] and counted by `cargo xtask`, not asserted. The
/// functional checks around it stay assertions everywhere.
#[macro_export]
macro_rules! assert_at_speed {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            let msg = format!($($arg)+);
            if $crate::slowdown() > 1 {
                use std::io::Write as _;
                // Straight to the descriptor: libtest captures eprintln!
                // of passing tests, and this line is for the summary.
                let _ = writeln!(
                    std::io::stderr(),
                    "{}{} ({}:{}): {}",
                    $crate::SPEED_UNMET_MARK,
                    stringify!($cond),
                    file!(),
                    line!(),
                    msg
                );
            } else {
                panic!("assertion failed: {}: {}", stringify!($cond), msg);
            }
        }
    };
}

/// A network namespace this process created; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> anyhow::Result<Self> {
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// A counter of the namespace's network stack (`nstat`, absolute
    /// values, without touching its history file).
    pub fn nstat(&self, counter: &str) -> anyhow::Result<u64> {
        let out = sh(self.cmd("nstat").args(["-asz", counter]))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(counter)).then(|| f.next()?.parse().ok())?
            })
            .with_context(|| format!("nstat has no counter {counter}"))
    }

    /// A command run in the namespace's network stack but the host's mount
    /// namespace (`nsenter --net`), unlike `ip netns exec`, which mounts a
    /// private /sys and would hide the daemon's bpffs pins from the host.
    pub fn cmd_keep_mounts(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a thread that has entered this namespace's network
    /// stack: sockets made there stay in this namespace wherever they are
    /// used afterwards.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        std::thread::spawn(move || {
            // SAFETY: setns on an open namespace file; it changes only this
            // thread, which ends after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in the namespace panicked"))?
    }

    /// Pings `addr` `count` times (0.2 s apart); true if all answered.
    pub fn ping(&self, addr: &str, count: u32) -> bool {
        self.cmd("ping")
            .args(["-c", &count.to_string(), "-i", "0.2", "-W", "2", "-q", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Round-trip times (ms, sorted) of `count` pings to `addr`, 10 ms
    /// apart: those answered, at most `count` x 10 ms plus a second.
    pub fn ping_times(&self, addr: &str, count: u32) -> anyhow::Result<Vec<f64>> {
        let out = sh(self.cmd("ping").args([
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            addr,
        ]))?;
        let mut t: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        t.sort_by(f64::total_cmp);
        Ok(t)
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        sh(self
            .cmd("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// client ns — gateway ns — server ns, wired and addressed.
pub struct Topology {
    pub id: String,
    pub client: Netns,
    pub gw: Netns,
    pub server: Netns,
    /// A second client (198.18.3.2), for client-to-client tests.
    pub client2: Netns,
}

/// An address on the server outside the usual split-include list.
pub const SERVER_OUTSIDE_SPLIT: &str = "198.18.4.2";
pub const CLIENT2_OUTSIDE: &str = "198.18.3.2";

impl Topology {
    pub fn new() -> anyhow::Result<Self> {
        let id = unique_id();
        let client = Netns::new(format!("vgt-{id}-c"))?;
        let gw = Netns::new(format!("vgt-{id}-g"))?;
        let server = Netns::new(format!("vgt-{id}-s"))?;
        // veths are created directly inside the namespaces: the host's
        // interfaces are never touched.
        client.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "up0", "netns", &gw.name,
        ])?;
        server.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", &gw.name,
        ])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_OUTSIDE}/24"),
            "dev",
            "eth0",
        ])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        gw.ip(&["addr", "add", &format!("{GW_OUTSIDE}/24"), "dev", "up0"])?;
        gw.ip(&["link", "set", "up0", "up"])?;
        gw.ip(&["addr", "add", &format!("{GW_INSIDE}/24"), "dev", "lan0"])?;
        gw.ip(&["addr", "add", "fd00:2::1/64", "dev", "lan0", "nodad"])?;
        gw.ip(&["link", "set", "lan0", "up"])?;
        server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "eth0"])?;
        server.ip(&[
            "addr",
            "add",
            &format!("{SERVER6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        server.ip(&["link", "set", "eth0", "up"])?;
        server.ip(&[
            "addr",
            "add",
            &format!("{SERVER_OUTSIDE_SPLIT}/24"),
            "dev",
            "eth0",
        ])?;
        server.ip(&["route", "add", POOL, "via", GW_INSIDE])?;
        server.ip(&["-6", "route", "add", POOL6, "via", "fd00:2::1"])?;
        gw.ip(&["route", "add", "198.18.4.0/24", "via", SERVER])?;
        let client2 = Netns::new(format!("vgt-{id}-d"))?;
        client2.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "up1", "netns", &gw.name,
        ])?;
        client2.ip(&[
            "addr",
            "add",
            &format!("{CLIENT2_OUTSIDE}/24"),
            "dev",
            "eth0",
        ])?;
        client2.ip(&["link", "set", "eth0", "up"])?;
        client2.ip(&["route", "add", "198.18.1.0/24", "via", "198.18.3.1"])?;
        gw.ip(&["addr", "add", "198.18.3.1/24", "dev", "up1"])?;
        gw.ip(&["link", "set", "up1", "up"])?;
        Ok(Topology {
            id,
            client,
            gw,
            server,
            client2,
        })
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("vpn-gateway-{tag}-{}", unique_id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("VPN_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Sends a signal to a child we started.
pub fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status();
}

/// Waits up to `timeout` for a child to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Stops a child with SIGTERM, then SIGKILL after 5 s.
pub fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        signal(child, "TERM");
        if wait_exit(child, Duration::from_secs(5)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The users most tests log in as.
pub const ALICE: TestUser<'static> = TestUser {
    name: "alice",
    password: "alice-pw",
    group_policy: None,
};
pub const BOB: TestUser<'static> = TestUser {
    name: "bob",
    password: "bob-pw",
    group_policy: None,
};

/// Lines added to the test config: to `[server]`, to `[tunnel]`, and
/// further sections.
#[derive(Default, Clone, Copy)]
pub struct ConfigParts<'a> {
    pub server: &'a str,
    pub tunnel: &'a str,
    pub rest: &'a str,
}

/// A user for the gateway's local database.
pub struct TestUser<'a> {
    pub name: &'a str,
    pub password: &'a str,
    pub group_policy: Option<&'a str>,
}

impl<'a> TestUser<'a> {
    /// Users named `names`, all with `password` and the default policy.
    pub fn all<S: AsRef<str>>(names: &'a [S], password: &'a str) -> Vec<TestUser<'a>> {
        names
            .iter()
            .map(|n| TestUser {
                name: n.as_ref(),
                password,
                group_policy: None,
            })
            .collect()
    }
}

/// A running `vpnd` in the gateway namespace.
pub struct Gateway {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub events: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub users_file: PathBuf,
    /// `pin-sha256:...` of the server certificate.
    pub pin: String,
}

impl Gateway {
    /// The config every test starts from, with `parts` added (TOML).
    pub fn base_config(dir: &Path, topo: &Topology, parts: &ConfigParts<'_>) -> String {
        let id = &topo.id;
        let ConfigParts {
            server,
            tunnel,
            rest,
        } = parts;
        let max = if server.contains("max_sessions") {
            ""
        } else {
            "max_sessions = 10"
        };
        let mtu = if tunnel.contains("mtu") {
            ""
        } else {
            "mtu = 1300"
        };
        format!(
            r#"[server]
listen = "{GW_OUTSIDE}:443"
state_dir = "{dir}/state"
control_socket = "{dir}/vpnd.sock"
event_log = "{dir}/events.jsonl"
bpf_pin_dir = "/sys/fs/bpf/vpn-test-{id}"
{max}
{server}

[auth]
users_file = "{dir}/users.toml"

[tunnel]
pool_v4 = "{POOL}"
pool_v6 = "{POOL6}"
{mtu}
{tunnel}

{rest}
"#,
            dir = dir.display()
        )
    }

    /// Starts vpnd with [`Gateway::base_config`] plus `parts`.
    pub fn start(
        topo: &Topology,
        parts: ConfigParts<'_>,
        users: &[TestUser<'_>],
    ) -> anyhow::Result<Self> {
        Self::start_with(topo, |dir| Self::base_config(dir, topo, &parts), users)
    }

    /// Starts vpnd with [`Gateway::base_config`] plus `rest`, its
    /// passwords checked by `method` (`auth.method`: "radius", "ldap").
    pub fn start_with_method(
        topo: &Topology,
        method: &str,
        rest: &str,
        users: &[TestUser<'_>],
    ) -> anyhow::Result<Self> {
        let parts = ConfigParts {
            rest,
            ..Default::default()
        };
        Self::start_with(
            topo,
            |dir| {
                Self::base_config(dir, topo, &parts).replacen(
                    "[auth]\n",
                    &format!("[auth]\nmethod = \"{method}\"\n"),
                    1,
                )
            },
            users,
        )
    }

    /// Starts vpnd in `topo`'s gateway namespace with the config `config`
    /// writes given the gateway's scratch directory.
    pub fn start_with(
        topo: &Topology,
        config: impl FnOnce(&Path) -> String,
        users: &[TestUser<'_>],
    ) -> anyhow::Result<Self> {
        Self::start_env(topo, config, users, &[])
    }

    /// [`Gateway::start_with`] with extra environment variables for vpnd.
    pub fn start_env(
        topo: &Topology,
        config: impl FnOnce(&Path) -> String,
        users: &[TestUser<'_>],
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let mut gw = Self::spawn(topo, config, users, env)?;
        gw.wait_ready()?;
        Ok(gw)
    }

    /// Starts vpnd as [`Gateway::start_env`] does, without waiting for it
    /// to be ready (to stop it at a moment of its start-up).
    pub fn spawn(
        topo: &Topology,
        config: impl FnOnce(&Path) -> String,
        users: &[TestUser<'_>],
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("gw")?;
        let config = config(dir.path());
        let config_path = dir.path().join("gateway.toml");
        let users_file = dir.path().join("users.toml");
        let mut db = vpn_daemon::auth::users::UserFile::default();
        for u in users {
            db.add(u.name, u.password, u.group_policy.map(str::to_owned))?;
        }
        db.write(&users_file)?;
        std::fs::write(&config_path, &config)?;
        let log = std::fs::File::create(dir.path().join("vpnd.log"))?;
        let child = topo
            .gw
            .cmd_keep_mounts(bin_dir().join("vpnd"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,vpnd=debug,vpn_daemon=debug")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting vpnd")?;
        let settings = vpn_daemon::config::Config::parse(&config, &config_path)?;
        let server = &settings.server;
        Ok(Gateway {
            child: Some(child),
            socket: server.control_socket.clone(),
            events: server.event_log.clone().unwrap_or_default(),
            pin_dir: server.bpf_pin_dir.clone(),
            state_dir: server.state_dir.clone(),
            config: config_path,
            users_file,
            pin: String::new(),
            dir,
        })
    }

    /// Starts vpnd again on the same configuration file and state
    /// directory (after [`Gateway::stop`] or [`Gateway::kill`]), its log
    /// appended to the first run's, and waits until it is ready.
    pub fn restart(&mut self, topo: &Topology) -> anyhow::Result<()> {
        if let Some(c) = &mut self.child {
            stop_child(c);
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("vpnd.log"))?;
        let child = topo
            .gw
            .cmd_keep_mounts(bin_dir().join("vpnd"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,vpnd=debug,vpn_daemon=debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting vpnd again")?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Kills vpnd with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until vpnd answers `vpnctl` (20 s at most), then reads the
    /// pin of its certificate.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Some(false);
            }
            self.vpnctl(&["stats"]).ok().map(|_| true)
        });
        if ready != Some(true) {
            bail!("vpnd did not become ready:\n{}", self.log());
        }
        let chain = vpn_daemon::transport::tls::read_chain(
            &self
                .state_dir
                .join(vpn_daemon::transport::tls::GENERATED_CERT),
        )?;
        self.pin = vpn_daemon::transport::tls::pin_sha256(&chain[0])?;
        Ok(())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vpnd.log")).unwrap_or_default()
    }

    /// Runs `vpnctl --socket ... ARGS`, returning stdout.
    pub fn vpnctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = sh(Command::new(bin_dir().join("vpnctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args))?;
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `vpnctl sessions --json`.
    pub fn sessions(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = serde_json::from_str(&self.vpnctl(&["sessions", "--json"])?)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `vpnctl stats --json`.
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.vpnctl(&["stats", "--json"])?)?)
    }

    /// Each packet worker's (datagrams in, packets out) from `vpnctl stats
    /// --json`; there is one per core (at most 8).
    pub fn worker_counts(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        let stats = self.stats()?;
        stats["dtls_rx"]["workers"]
            .as_array()
            .with_context(|| format!("no workers in {stats}"))?
            .iter()
            .map(|w| Some((w["datagrams_in"].as_u64()?, w["packets_out"].as_u64()?)))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("worker counters in {stats}"))
    }

    /// The packet worker whose socket takes `ns`'s DTLS datagrams: the one
    /// whose count rises most while `ns` pings through its tunnel.
    pub fn worker_of(&self, ns: &Netns) -> anyhow::Result<usize> {
        let before = self.worker_counts()?;
        ensure!(ns.ping(SERVER, 3), "no ping through {}'s tunnel", ns.name);
        let after = self.worker_counts()?;
        Ok((0..after.len().min(before.len()))
            .max_by_key(|&i| after[i].0 - before[i].0)
            .unwrap_or(0))
    }

    /// Two DTLS clients: `a` (user, password) from `topo.client`, then `b`
    /// from `topo.client2`, who reconnects (a new port: the kernel spreads
    /// clients over the workers' sockets by address and port) until he
    /// lands on `a`'s packet worker (`same`) or on another one (with a
    /// single worker, at once). 16 tries at most: on 2 workers all miss
    /// once in 65,536 runs.
    pub fn dtls_pair(
        &self,
        topo: &Topology,
        a: (&str, &str),
        b: (&str, &str),
        extra: &[&str],
        same: bool,
    ) -> anyhow::Result<(Client, Client)> {
        let mut ca = Client::start(topo, self, a.0, a.1, extra)?;
        ca.wait_connected(Duration::from_secs(30))?;
        ca.wait_dtls(Duration::from_secs(15))?;
        let workers = self.worker_counts()?.len();
        let worker_a = self.worker_of(&topo.client)?;
        for _ in 0..16 {
            let mut cb = Client::start_in(&topo.client2, self, b.0, b.1, extra)?;
            cb.wait_connected(Duration::from_secs(30))?;
            cb.wait_dtls(Duration::from_secs(15))?;
            if (workers == 1 && !same) || (self.worker_of(&topo.client2)? == worker_a) == same {
                return Ok((ca, cb));
            }
        }
        bail!(
            "{} never landed on {} packet worker as {}",
            b.0,
            if same { "the same" } else { "another" },
            a.0
        )
    }

    /// A drop counter from `vpnctl stats --json`.
    pub fn drops(&self, reason: &str) -> anyhow::Result<u64> {
        let v = self.stats()?;
        v["drops"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d[0] == reason))
            .and_then(|d| d[1].as_u64())
            .ok_or_else(|| anyhow!("no drop counter '{reason}' in {v}"))
    }

    /// The first session's DTLS peer (address:port), once one shows (5 s
    /// at most).
    pub fn dtls_peer(&self) -> Option<String> {
        wait_for(Duration::from_secs(5), || {
            self.sessions().ok()?.first()?["dtls_peer"]
                .as_str()
                .map(str::to_owned)
        })
    }

    /// Runs `vpnctl user ARGS --users FILE` on the gateway's user file
    /// with `stdin` (a password) as its input.
    pub fn vpnctl_user(&self, args: &[&str], stdin: &str) -> Output {
        let mut c = Command::new(bin_dir().join("vpnctl"))
            .arg("user")
            .args(args)
            .arg("--users")
            .arg(&self.users_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vpnctl starts");
        // Commands that read no password may exit before we write.
        let _ = writeln!(c.stdin.take().expect("piped stdin"), "{stdin}");
        c.wait_with_output().expect("vpnctl ends")
    }

    /// The events of type `kind` logged so far, oldest first.
    pub fn events_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// All events logged so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("vpnd running")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops vpnd with SIGTERM and waits for it.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        signal(&c, "TERM");
        let st = wait_exit(&mut c, Duration::from_secs(10));
        if st.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        st
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            stop_child(c);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if std::thread::panicking() {
            eprintln!("---- vpnd log ----\n{}", self.log());
        }
    }
}

/// The script openconnect runs: records the environment it was given per
/// `reason`, configures the tunnel device minimally (no resolv.conf
/// changes, which would touch the host's files), and marks the reason
/// done (`done.$reason`) once the device is configured.
const CLIENT_SCRIPT: &str = r#"#!/bin/sh
env -0 > "$OCDIR/env.$reason"
echo "$reason" >> "$OCDIR/reasons"
case "$reason" in
  connect)
    ip link set dev "$TUNDEV" up mtu "$INTERNAL_IP4_MTU"
    ip addr add "$INTERNAL_IP4_ADDRESS/32" dev "$TUNDEV"
    ip route add 198.18.2.0/24 dev "$TUNDEV"
    ip route add 198.19.0.0/24 dev "$TUNDEV"
    # Clients started with start_at also route the split-include list.
    i=0
    while [ -n "$VG_SPLIT_ROUTES" ] && [ "$i" -lt "${CISCO_SPLIT_INC:-0}" ]; do
      eval a=\$CISCO_SPLIT_INC_${i}_ADDR
      eval m=\$CISCO_SPLIT_INC_${i}_MASKLEN
      ip route replace "$a/$m" dev "$TUNDEV"
      i=$((i+1))
    done
    if [ -n "$INTERNAL_IP6_NETMASK" ]; then
      ip -6 addr add "$INTERNAL_IP6_NETMASK" dev "$TUNDEV" nodad
      ip -6 route add fd00:2::/64 dev "$TUNDEV"
    fi
    ;;
esac
: > "$OCDIR/done.$reason"
exit 0
"#;

/// A running openconnect in the client namespace.
pub struct Client {
    child: Option<Child>,
    pub dir: TempDir,
}

impl Client {
    /// openconnect's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts `openconnect` logging in as `user` with `password` on stdin.
    pub fn start(
        topo: &Topology,
        gw: &Gateway,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(&topo.client, &gw.pin, extra, Some((user, password)), None)
    }

    /// The same from another client namespace (`topo.client2`).
    pub fn start_in(
        ns: &Netns,
        gw: &Gateway,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(ns, &gw.pin, extra, Some((user, password)), None)
    }

    /// Starts `openconnect` against any server (ocserv in the benchmarks)
    /// pinned by `pin`.
    pub fn start_pinned(
        ns: &Netns,
        pin: &str,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(ns, pin, extra, Some((user, password)), None)
    }

    /// Starts `openconnect` with a cookie instead of a login.
    pub fn start_with_cookie(topo: &Topology, gw: &Gateway, cookie: &str) -> anyhow::Result<Self> {
        Self::start_with(&topo.client, &gw.pin, &[], None, Some(cookie))
    }

    /// openconnect logging in as `user` with DTLS in PSK-NEGOTIATE mode,
    /// once connected and its DTLS channel is up.
    pub fn start_psk_dtls(
        topo: &Topology,
        gw: &Gateway,
        user: &TestUser<'_>,
    ) -> anyhow::Result<Self> {
        let mut c = Self::start(
            topo,
            gw,
            user.name,
            user.password,
            &["--dtls-ciphers=PSK-NEGOTIATE"],
        )?;
        c.wait_connected(Duration::from_secs(20))?;
        c.wait_dtls(Duration::from_secs(10))?;
        Ok(c)
    }

    /// A client in `ns` logging in to the gateway at `host`.
    pub fn start_at(
        ns: &Netns,
        pin: &str,
        host: &str,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_to(ns, pin, host, extra, Some((user, password)), None)
    }

    /// Whether the connect script routes the pushed split-include list.
    fn routes_split(host: &str) -> bool {
        host != GW_OUTSIDE
    }

    /// A client in `ns` resuming a session with its cookie at `host`.
    pub fn start_with_cookie_at(
        ns: &Netns,
        pin: &str,
        host: &str,
        cookie: &str,
    ) -> anyhow::Result<Self> {
        Self::start_to(ns, pin, host, &[], None, Some(cookie))
    }

    fn start_with(
        ns: &Netns,
        pin: &str,
        extra: &[&str],
        login: Option<(&str, &str)>,
        cookie: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_to(ns, pin, GW_OUTSIDE, extra, login, cookie)
    }

    fn start_to(
        ns: &Netns,
        pin: &str,
        host: &str,
        extra: &[&str],
        login: Option<(&str, &str)>,
        cookie: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("oc")?;
        let script = dir.path().join("script.sh");
        std::fs::write(&script, CLIENT_SCRIPT)?;
        sh(Command::new("chmod").arg("755").arg(&script))?;
        let log = std::fs::File::create(dir.path().join("openconnect.log"))?;
        let mut cmd = ns.cmd("openconnect");
        if Self::routes_split(host) {
            cmd.env("VG_SPLIT_ROUTES", "1");
        }
        cmd.env("OCDIR", dir.path())
            .args([
                "-v",
                "--protocol=anyconnect",
                "--servercert",
                pin,
                "--script",
            ])
            .arg(&script)
            .args(["-i", "octun0", "--reconnect-timeout", "30"])
            .args(extra);
        match (login, cookie) {
            (Some((user, _)), _) => {
                cmd.args(["-u", user, "--passwd-on-stdin"]);
            }
            (None, Some(_)) => {
                cmd.arg("--cookie-on-stdin");
            }
            _ => {}
        }
        cmd.arg(format!("https://{host}/"));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting openconnect")?;
        {
            let mut stdin = child.stdin.take().expect("piped stdin");
            let line = match (login, cookie) {
                (Some((_, pw)), _) => pw.to_owned(),
                (None, Some(c)) => c.to_owned(),
                _ => String::new(),
            };
            let _ = writeln!(stdin, "{line}");
            // Dropping stdin closes it: a second password prompt gets EOF.
        }
        Ok(Client {
            child: Some(child),
            dir,
        })
    }

    /// Waits until the connect script ran; returns the environment it got.
    pub fn wait_connected(&mut self, timeout: Duration) -> anyhow::Result<HashMap<String, String>> {
        // Once the script has configured the device and its routes: on an
        // emulated CPU its dozen `ip` commands take seconds.
        let done = self.dir.path().join("done.connect");
        let got = wait_for(timeout, || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Some(false);
            }
            done.exists().then_some(true)
        });
        if got != Some(true) {
            bail!("openconnect did not connect:\n{}", self.log());
        }
        self.env("connect")
    }

    /// Waits until openconnect reports an established DTLS channel.
    pub fn wait_dtls(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for(timeout, || {
            self.log()
                .contains("Established DTLS connection")
                .then_some(())
        })
        .ok_or_else(|| anyhow!("no DTLS channel:\n{}", self.log()))
    }

    /// The environment openconnect passed to the script for `reason`.
    pub fn env(&self, reason: &str) -> anyhow::Result<HashMap<String, String>> {
        // NUL-separated (`env -0`): values such as the banner span lines.
        let text = std::fs::read_to_string(self.dir.path().join(format!("env.{reason}")))?;
        Ok(text
            .split('\0')
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// The script reasons seen so far, in order.
    pub fn reasons(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("reasons"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("openconnect.log")).unwrap_or_default()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("openconnect running")
    }

    /// Waits for openconnect to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(self.child_mut(), timeout)
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            stop_child(c);
        }
        if std::thread::panicking() {
            eprintln!("---- openconnect log ----\n{}", self.log());
        }
    }
}

/// The session cookie itself from [`authenticate`]'s `COOKIE` value.
pub fn webvpn_cookie(cookie: &str) -> &str {
    cookie.rsplit("webvpn=").next().unwrap_or(cookie)
}

/// Sends `CONNECT /CSCOSSLC/tunnel` with session cookie `cookie` over `s`
/// and returns the answer's head (the tunnel follows on `s`).
pub fn raw_connect(s: &mut RawTls, cookie: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    s.write_all(
        format!("CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: x\r\nCookie: webvpn={cookie}\r\n\r\n")
            .as_bytes(),
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? != 1 {
            bail!("the connection closed during the CONNECT answer");
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// Runs openconnect `--authenticate` and returns the `COOKIE` it prints.
pub fn authenticate(
    topo: &Topology,
    gw: &Gateway,
    user: &str,
    password: &str,
) -> anyhow::Result<String> {
    authenticate_at(&topo.client, &gw.pin, GW_OUTSIDE, user, password)
}

/// [`authenticate`] from namespace `ns` against the gateway at `host`.
pub fn authenticate_at(
    ns: &Netns,
    pin: &str,
    host: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<String> {
    let mut child = ns
        .cmd("openconnect")
        .args([
            "--authenticate",
            "--protocol=anyconnect",
            "--servercert",
            pin,
            "-u",
            user,
            "--passwd-on-stdin",
        ])
        .arg(format!("https://{host}/"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    writeln!(child.stdin.take().unwrap(), "{password}")?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("COOKIE="))
        .map(|c| c.trim_matches('\'').to_owned())
        .ok_or_else(|| {
            anyhow!(
                "no COOKIE from openconnect --authenticate: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Runs iperf3 from `client` to a server in `server` for `secs`; returns
/// the bits per second received.
pub fn iperf3(
    client: &Netns,
    server: &Netns,
    server_addr: &str,
    secs: u32,
    reverse: bool,
) -> anyhow::Result<f64> {
    let port = 5201 + (COUNTER.fetch_add(1, Ordering::Relaxed) % 100) as u16;
    iperf3_with(
        client,
        server,
        server_addr,
        port,
        secs,
        if reverse { &["-R"] } else { &[] },
    )
}

/// iperf3 on `port` with extra client arguments (`-u -b 10M`, `-R`);
/// returns the bits per second the receiver got, or an error when the test
/// could not run (no connection).
pub fn iperf3_with(
    client: &Netns,
    server: &Netns,
    server_addr: &str,
    port: u16,
    secs: u32,
    extra: &[&str],
) -> anyhow::Result<f64> {
    let v = iperf3_json(client, server, server_addr, port, secs, extra)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 failed: {}", v["error"]))
}

/// A fixed pseudo-random byte stream (xorshift64), the same for a seed on
/// both ends of a transfer.
pub fn test_stream(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` over TCP from `from` to a listener at `to_addr:port` in
/// `to` and returns what the listener received, byte for byte (30 s at
/// most): the check that segmentation and merging lose and corrupt nothing.
pub fn tcp_transfer(
    from: &Netns,
    to: &Netns,
    to_addr: &str,
    port: u16,
    data: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = std::net::SocketAddr::new(to_addr.parse()?, port);
    let listener = to.within(move || std::net::TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let receiver = std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
        // Bounded: a sender that never connects ends this in 15 s.
        let (mut s, _) = wait_for(Duration::from_secs(15), || listener.accept().ok())
            .context("nobody connected to the transfer listener")?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    });
    let mut s =
        from.within(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)))??;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    receiver.join().map_err(|_| anyhow!("receiver panicked"))?
}

/// iperf3's JSON report (UDP results are under `end.sum`).
pub fn iperf3_json(
    client: &Netns,
    server: &Netns,
    server_addr: &str,
    port: u16,
    secs: u32,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut srv = server
        .cmd("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut cmd = client.cmd("timeout");
    cmd.args([
        &(secs + 8).to_string(),
        "iperf3",
        "-J",
        "--connect-timeout",
        "3000",
        "-c",
        server_addr,
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
    ])
    .args(extra);
    let out = cmd.output();
    let _ = srv.kill();
    let _ = srv.wait();
    let out = out?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs `f` on a thread that has entered `ns`'s network namespace: sockets
/// it creates live there (a namespace belongs to a thread, so the test's
/// own thread never moves).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f_ns = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let r = unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TLS connection of our own to the gateway.
pub type RawTls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection from the client namespace to the gateway, for tests
/// that send what openconnect never would. The certificate is not checked:
/// this talks to the gateway the test itself started.
pub fn raw_tls(topo: &Topology) -> anyhow::Result<RawTls> {
    raw_tls_from(&topo.client, None)
}

/// [`raw_tls`] from namespace `ns`, from source address `src` if given
/// (one of `ns`'s own addresses).
pub fn raw_tls_from(ns: &Netns, src: Option<&str>) -> anyhow::Result<RawTls> {
    let src: Option<std::net::IpAddr> = src.map(str::parse).transpose()?;
    let tcp = in_netns(ns, move || -> std::io::Result<std::net::TcpStream> {
        let gw: std::net::SocketAddr =
            (GW_OUTSIDE.parse::<std::net::IpAddr>().unwrap(), 443).into();
        match src {
            None => std::net::TcpStream::connect(gw),
            Some(ip) => {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&std::net::SocketAddr::new(ip, 0).into())?;
                s.connect_timeout(&gw.into(), Duration::from_secs(10))?;
                Ok(s.into())
            }
        }
    })?;
    tls_over(tcp)
}

/// A TLS client (certificate not checked) over a TCP connection already
/// made to the gateway.
pub fn tls_over(tcp: std::net::TcpStream) -> anyhow::Result<RawTls> {
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), "vpn-gateway".try_into()?)?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// Reads an HTTP response (head and Content-Length body) from a stream.
pub fn read_http_response(io: &mut impl std::io::Read) -> anyhow::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if io.read(&mut byte)? == 0 {
            bail!(
                "connection closed after {} bytes: {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf)
            );
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    io.read_exact(&mut body)?;
    Ok((status, format!("{head}{}", String::from_utf8_lossy(&body))))
}

/// Sends a UDP datagram with any source address, IP header and all, from
/// a raw socket in `ns`; the route to `dst` (a tunnel) decides where it
/// goes. For tests that send what a client's stack never would.
pub fn send_raw_udp(
    ns: &Netns,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    dport: u16,
    payload: &[u8],
) -> anyhow::Result<()> {
    send_raw_udp_ports(ns, (src, 40_000), (dst, dport), payload)
}

/// [`send_raw_udp`] from a chosen source port too (one a socket of
/// someone else's may hold: the raw socket does not care).
pub fn send_raw_udp_ports(
    ns: &Netns,
    (src, sport): (std::net::IpAddr, u16),
    (dst, dport): (std::net::IpAddr, u16),
    payload: &[u8],
) -> anyhow::Result<()> {
    use std::net::IpAddr;
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(payload);
    let (src_b, dst_b): (Vec<u8>, Vec<u8>) = match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (a.octets().into(), b.octets().into()),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.octets().into(), b.octets().into()),
        _ => bail!("mixed address families"),
    };
    // The UDP checksum over the pseudo-header (required for IPv6).
    let mut sum: u32 = 0;
    let mut add = |d: &[u8]| {
        for c in d.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src_b);
    add(&dst_b);
    add(&[0, 17]);
    add(&(udp.len() as u16).to_be_bytes());
    add(&udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&ck.to_be_bytes());
    let mut pkt = Vec::new();
    if src.is_ipv4() {
        pkt.extend_from_slice(&[0x45, 0]);
        pkt.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    } else {
        pkt.extend_from_slice(&[0x60, 0, 0, 0]);
        pkt.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        pkt.extend_from_slice(&[17, 64]);
    }
    pkt.extend_from_slice(&src_b);
    pkt.extend_from_slice(&dst_b);
    pkt.extend_from_slice(&udp);
    in_netns(ns, move || -> anyhow::Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        let (domain, to) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, std::net::SocketAddr::new(dst, 0)),
            IpAddr::V6(_) => (Domain::IPV6, std::net::SocketAddr::new(dst, 0)),
        };
        // IPPROTO_RAW: the packet carries its own IP header (raw(7)).
        let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
        s.send_to(&pkt, &to.into())?;
        Ok(())
    })
}

/// UDP listeners on port `port` of every address of `ns` (IPv4 and IPv6)
/// that collect what arrives, until dropped.
pub struct UdpCollector {
    got: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpCollector {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Self> {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
            let s = in_netns(ns, move || {
                let s = socket2::Socket::new(
                    if addr.starts_with('[') {
                        socket2::Domain::IPV6
                    } else {
                        socket2::Domain::IPV4
                    },
                    socket2::Type::DGRAM,
                    None,
                )?;
                if addr.starts_with('[') {
                    s.set_only_v6(true)?;
                }
                s.bind(&addr.parse::<std::net::SocketAddr>().unwrap().into())?;
                Ok::<_, std::io::Error>(std::net::UdpSocket::from(s))
            })?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (got, stop) = (got.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = s.recv(&mut buf) {
                        got.lock().unwrap().push(buf[..n].to_vec());
                    }
                }
            }));
        }
        Ok(UdpCollector { got, stop, threads })
    }

    /// How many datagrams arrived carrying exactly `payload`.
    pub fn count(&self, payload: &[u8]) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.as_slice() == payload)
            .count()
    }
}

impl Drop for UdpCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A DTLS 1.2 ClientHello (one record, epoch 0, message_seq 0) carrying
/// `session_id`, offering PSK-AES128-GCM-SHA256: what openconnect sends
/// with the App-ID, as far as the gateway's matching goes.
pub fn dtls_client_hello(session_id: &[u8; 32]) -> Vec<u8> {
    let mut body = vec![0xfe, 0xfd];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(32);
    body.extend_from_slice(session_id);
    body.extend_from_slice(&[0, 0, 2, 0x00, 0xa8, 1, 0]);
    let len = body.len() as u32;
    let mut hs = vec![1];
    hs.extend_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&[0, 0, 0, 0, 0]);
    hs.extend_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// An aggregate-auth request as openconnect sends it (`POST /`).
pub fn xml_request(body: &str) -> String {
    format!(
        "POST / HTTP/1.1\r\nHost: {GW_OUTSIDE}\r\nX-Aggregate-Auth: 1\r\nX-Transcend-Version: 1\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The `init` document that starts a login.
pub const AUTH_INIT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="init" aggregate-auth-version="2"><version who="vpn">v9.01</version><device-id>linux-64</device-id><group-access>https://vpn-gateway/</group-access></config-auth>"#;

/// The `auth-reply` document answering the form of login `handle`.
pub fn auth_reply(handle: &str, user: &str, password: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-reply" aggregate-auth-version="2"><version who="vpn">v9.01</version><device-id>linux-64</device-id><opaque is-for="sg"><aggauth-handle>{handle}</aggauth-handle></opaque><auth><username>{user}</username><password>{password}</password></auth></config-auth>"#
    )
}

/// Posts an aggregate-auth document on `s`; returns the status and the
/// whole response.
pub fn post_xml(s: &mut RawTls, body: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Write;
    s.write_all(xml_request(body).as_bytes())?;
    read_http_response(s)
}

/// The login handle (`aggauth-handle`) of a login form.
pub fn form_handle(text: &str) -> Option<String> {
    let start = text.find("<aggauth-handle>")? + "<aggauth-handle>".len();
    let end = start + text[start..].find("</aggauth-handle>")?;
    Some(text[start..end].to_owned())
}

#[derive(Debug)]
struct AnyCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
