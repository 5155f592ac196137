//! ocserv 1.1.6 (Debian) as the benchmarks' reference gateway, on the same
//! namespace topology as vpnd: same listen address, a self-signed
//! certificate, plain password auth.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use vpn_tests::{TempDir, Topology, sh, stop_child};

/// How to set ocserv up.
pub struct Setup {
    /// The `plain` auth file: `name:group:crypt-hash` lines.
    pub passwd: String,
    pub max_clients: usize,
    /// The client pool, e.g. ("198.19.0.0", "255.255.255.0").
    pub network: (&'static str, &'static str),
    /// Minimum milliseconds between new connections (ocserv's default 100
    /// would cap logins at 10/s; 0 turns it off).
    pub rate_limit_ms: u32,
    /// Serve occtl on a socket (`Ocserv::occtl`).
    pub occtl: bool,
}

pub struct Ocserv {
    pub child: Child,
    dir: TempDir,
    pub pin: String,
}

impl Drop for Ocserv {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

impl Ocserv {
    pub fn start(topo: &Topology, setup: &Setup) -> anyhow::Result<Ocserv> {
        let dir = TempDir::new("ocserv")?;
        let d = dir.path();
        sh(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=bench",
            ])
            .arg("-keyout")
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("cert.pem")))?;
        std::fs::write(d.join("passwd"), &setup.passwd)?;
        let conf = format!(
            r#"auth = "plain[passwd={d}/passwd]"
listen-host = 198.18.1.1
tcp-port = 443
udp-port = 443
run-as-user = root
run-as-group = root
socket-file = {d}/ocserv.sock
occtl-socket-file = {d}/occtl.sock
use-occtl = {occtl}
pid-file = {d}/ocserv.pid
server-cert = {d}/cert.pem
server-key = {d}/key.pem
isolate-workers = false
max-clients = {max}
max-same-clients = 0
rate-limit-ms = {rate}
max-ban-score = 0
keepalive = 32400
dpd = 90
mobile-dpd = 1800
switch-to-tcp-timeout = 25
try-mtu-discovery = false
tls-priorities = "NORMAL:%SERVER_PRECEDENCE"
auth-timeout = 240
cookie-timeout = 300
deny-roaming = false
rekey-time = 172800
rekey-method = ssl
device = vpns
predictable-ips = true
ipv4-network = {net}
ipv4-netmask = {mask}
route = 198.18.2.0/255.255.255.0
ping-leases = false
"#,
            d = d.display(),
            occtl = setup.occtl,
            max = setup.max_clients,
            rate = setup.rate_limit_ms,
            net = setup.network.0,
            mask = setup.network.1,
        );
        let conf_path = d.join("ocserv.conf");
        std::fs::write(&conf_path, conf)?;
        topo.gw.sysctl("net.ipv4.ip_forward", "1")?;
        let log = std::fs::File::create(d.join("ocserv.log"))?;
        let child = topo
            .gw
            .cmd("ocserv")
            .args(["-f", "-c"])
            .arg(&conf_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting ocserv (apt-get install ocserv)")?;
        std::thread::sleep(Duration::from_secs(2));
        let chain = vpn_daemon::transport::tls::read_chain(&d.join("cert.pem"))?;
        let pin = vpn_daemon::transport::tls::pin_sha256(&chain[0])?;
        Ok(Ocserv { child, dir, pin })
    }

    /// The occtl socket, when `Setup::occtl` was set.
    pub fn occtl_socket(&self) -> PathBuf {
        self.dir.path().join("occtl.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ocserv.log")).unwrap_or_default()
    }
}

/// A crypt(3) hash of `password` made by openssl: `-6` SHA-512, `-5`
/// SHA-256.
pub fn crypt(kind: &str, password: &str) -> anyhow::Result<String> {
    let out = sh(Command::new("openssl").args(["passwd", kind, password]))?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
