//! The server's private key lives in a process of its own.
//!
//! vpnd parses everything clients send; a bug there that reads memory it
//! should not (what Heartbleed was) must not be able to reach the TLS
//! key. So vpnd never reads the key file: at start it runs itself again
//! as `vpnd --key-signer KEY` (generating the key and a self-signed
//! certificate first when none is configured), and that process reads the
//! key, then locks itself down before it answers anything:
//!
//! - user and group `nobody` (65534), no capabilities, no new privileges;
//! - a seccomp filter that allows the dozen system calls signing takes
//!   (reading and writing its socket, memory, `getrandom`, exiting) and
//!   kills the process on any other;
//! - it dies with vpnd (`PR_SET_PDEATHSIG`).
//!
//! vpnd talks to it over a socket pair, one request at a time: a
//! signature scheme and the bytes to sign in, the signature out
//! ([`RemoteKey`] is rustls' `SigningKey`). That is the whole interface:
//! the key cannot be asked for, only used. A TLS handshake costs one round
//! trip to it (tens of microseconds beside the handshake's own
//! milliseconds). If it dies, vpnd starts it again for the next handshake
//! and says so.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use parking_lot::Mutex;
use rustls::{
    SignatureAlgorithm, SignatureScheme,
    pki_types::SubjectPublicKeyInfoDer,
    sign::{Signer, SigningKey},
};

/// The hidden `vpnd` option that makes it the signer.
pub const ARG: &str = "--key-signer";

/// The longest message to sign (a TLS handshake's is a few hundred bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// Every scheme rustls may offer, to ask the key which it can do.
const SCHEMES: [SignatureScheme; 9] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// How to start the signer: the key file, and the certificate to generate
/// with the key when they do not exist yet (a self-signed one for these
/// names).
#[derive(Debug, Clone)]
pub struct Spawn {
    pub key: PathBuf,
    pub generate: Option<(PathBuf, Vec<String>)>,
}

impl Spawn {
    fn command(&self) -> anyhow::Result<(Command, UnixStream)> {
        let (ours, theirs) = UnixStream::pair().context("a socket pair for the key signer")?;
        let exe = std::env::current_exe().context("finding vpnd's own executable")?;
        let mut c = Command::new(exe);
        c.arg(ARG).arg(&self.key);
        if let Some((cert, names)) = &self.generate {
            c.arg("--generate-cert").arg(cert);
            for n in names {
                c.arg("--name").arg(n);
            }
        }
        c.stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        Ok((c, ours))
    }
}

impl Spawn {
    /// Starts a signer for another process (the broker starts one for
    /// vpnd): the child, and the socket to give away.
    pub fn start_detached(&self) -> anyhow::Result<(Child, UnixStream)> {
        let (mut cmd, stream) = self.command()?;
        let child = cmd.spawn().context("starting the key signer")?;
        Ok((child, stream))
    }
}

/// Starts a signer elsewhere and returns the socket to it and its pid.
pub type Restart = Box<dyn Fn() -> anyhow::Result<(UnixStream, u32)> + Send + Sync>;

/// A running signer.
struct Link {
    /// Ours to stop, unless another process started it.
    child: Option<Child>,
    pid: u32,
    stream: UnixStream,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key signer {}", self.pid)
    }
}

impl Link {
    /// Starts the signer and reads what its key is.
    fn start(spawn: &Spawn) -> anyhow::Result<(Link, KeyInfo)> {
        let (mut cmd, stream) = spawn.command()?;
        let child = cmd.spawn().context("starting the key signer")?;
        Link::over(stream, child.id(), Some(child))
    }

    /// The signer at the end of `stream`, once it says what its key is.
    fn over(stream: UnixStream, pid: u32, child: Option<Child>) -> anyhow::Result<(Link, KeyInfo)> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut link = Link { child, pid, stream };
        let info = KeyInfo::read(&mut link.stream).map_err(|e| {
            let status = link
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            anyhow!(
                "the key signer did not start ({e}{})",
                status.map_or(String::new(), |s| format!("; it exited: {s}"))
            )
        })?;
        Ok((link, info))
    }

    fn sign(&mut self, scheme: SignatureScheme, message: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut req = Vec::with_capacity(6 + message.len());
        req.extend_from_slice(&u16::from(scheme).to_be_bytes());
        req.extend_from_slice(&(message.len() as u32).to_be_bytes());
        req.extend_from_slice(message);
        self.stream.write_all(&req)?;
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(std::io::Error::other("an oversized answer"));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        match head[0] {
            1 => Ok(body),
            _ => Err(std::io::Error::other(
                String::from_utf8_lossy(&body).into_owned(),
            )),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The signer ends at the end of its socket. (vpnd cannot signal
        // it: it runs as nobody, and vpnd has no CAP_KILL once it serves.)
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the signer says its key is, once, at start.
#[derive(Debug, Clone, PartialEq)]
struct KeyInfo {
    algorithm: SignatureAlgorithm,
    schemes: Vec<SignatureScheme>,
    spki: Vec<u8>,
}

impl KeyInfo {
    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut b = vec![u8::from(self.algorithm), self.schemes.len() as u8];
        for s in &self.schemes {
            b.extend_from_slice(&u16::from(*s).to_be_bytes());
        }
        b.extend_from_slice(&(self.spki.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.spki);
        w.write_all(&b)
    }

    fn read(r: &mut impl Read) -> std::io::Result<Self> {
        let mut h = [0u8; 2];
        r.read_exact(&mut h)?;
        let mut schemes = Vec::new();
        for _ in 0..h[1] {
            let mut s = [0u8; 2];
            r.read_exact(&mut s)?;
            schemes.push(SignatureScheme::from(u16::from_be_bytes(s)));
        }
        let mut l = [0u8; 4];
        r.read_exact(&mut l)?;
        let len = u32::from_be_bytes(l) as usize;
        if len > MAX_MESSAGE {
            return Err(std::io::Error::other("an oversized public key"));
        }
        let mut spki = vec![0u8; len];
        r.read_exact(&mut spki)?;
        Ok(KeyInfo {
            algorithm: SignatureAlgorithm::from(h[0]),
            schemes,
            spki,
        })
    }
}

/// The server key as rustls sees it: every signature is the signer's.
pub struct RemoteKey {
    info: KeyInfo,
    spawn: Spawn,
    link: Arc<Mutex<Option<Link>>>,
    restart: Arc<std::sync::OnceLock<Restart>>,
}

impl RemoteKey {
    /// Starts the signer (generating key and certificate first when
    /// `spawn.generate` says so and they do not exist).
    pub fn start(spawn: Spawn) -> anyhow::Result<Arc<Self>> {
        let (link, info) = Link::start(&spawn)?;
        Ok(Arc::new(RemoteKey {
            info,
            spawn,
            link: Arc::new(Mutex::new(Some(link))),
            restart: Arc::default(),
        }))
    }

    /// From now on a signer that failed is started again by `restart`
    /// (once vpnd serves as nobody it cannot read the key to start one).
    pub fn restart_through(&self, restart: Restart) {
        let _ = self.restart.set(restart);
    }

    /// The signer's process id (for tests and the log).
    pub fn pid(&self) -> Option<u32> {
        self.link.lock().as_ref().map(|l| l.pid)
    }
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = *self.info.schemes.iter().find(|s| offered.contains(s))?;
        Some(Box::new(RemoteSigner {
            scheme,
            spawn: self.spawn.clone(),
            link: self.link.clone(),
            restart: self.restart.clone(),
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.info.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.info.algorithm
    }
}

struct RemoteSigner {
    scheme: SignatureScheme,
    spawn: Spawn,
    link: Arc<Mutex<Option<Link>>>,
    restart: Arc<std::sync::OnceLock<Restart>>,
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteKey({:?})", self.link.lock())
    }
}

impl std::fmt::Debug for RemoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteSigner({:?})", self.scheme)
    }
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut link = self.link.lock();
        if let Some(l) = link.as_mut() {
            match l.sign(self.scheme, message) {
                Ok(sig) => return Ok(sig),
                Err(e) => {
                    let status = l.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    tracing::warn!(
                        pid = l.pid,
                        "the key signer failed ({e}{}); starting it again",
                        status.map_or(String::new(), |s| format!("; it exited: {s}"))
                    );
                    *link = None;
                }
            }
        }
        let started = match self.restart.get() {
            Some(restart) => restart().and_then(|(stream, pid)| Link::over(stream, pid, None)),
            None => Link::start(&self.spawn),
        };
        let (mut l, _) = started.map_err(|e| {
            tracing::error!("{e:#}");
            rustls::Error::General("the key signer is not running".into())
        })?;
        tracing::info!(pid = l.pid, "key signer started again");
        let sig = l
            .sign(self.scheme, message)
            .map_err(|e| rustls::Error::General(format!("the key signer: {e}")));
        *link = Some(l);
        sig
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// The signer's side (`vpnd --key-signer KEY [--generate-cert CERT --name
/// N...]`): reads or makes the key, locks itself down, then signs what
/// its socket (stdin) asks until vpnd closes it.
pub fn serve(key: &Path, generate: Option<(&Path, &[String])>) -> anyhow::Result<()> {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // Nothing of vpnd's but the socket (0) and the log (2): a descriptor
    // that lacked close-on-exec (a tunnel queue, a map) must not reach a
    // process whose job is only to sign.
    // SAFETY: close_range on descriptors this process does not use.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        for fd in fds.into_iter().filter(|fd| *fd > 2) {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
    }
    if let Some((cert, names)) = generate
        && (!cert.exists() || !key.exists())
    {
        super::tls::generate(names, cert, key)?;
    }
    let signing = {
        let mut pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        let der = rustls_pemfile::private_key(&mut &pem[..])
            .with_context(|| format!("parsing private key in {}", key.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                    key.display()
                )
            })?;
        pem.fill(0);
        rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| anyhow!("{}: {e}", key.display()))?
    };
    let info = KeyInfo {
        algorithm: signing.algorithm(),
        schemes: SCHEMES
            .iter()
            .copied()
            .filter(|s| signing.choose_scheme(&[*s]).is_some())
            .collect(),
        spki: signing
            .public_key()
            .map(|k| k.as_ref().to_vec())
            .unwrap_or_default(),
    };
    lock_down()?;
    // SAFETY: fd 0 is the socket vpnd gave us, and nothing else owns it.
    let mut sock = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(0) };
    info.write(&mut sock)?;
    loop {
        let mut head = [0u8; 6];
        match sock.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let scheme = SignatureScheme::from(u16::from_be_bytes([head[0], head[1]]));
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
        if len > MAX_MESSAGE {
            bail!("a request of {len} bytes");
        }
        let mut msg = vec![0u8; len];
        sock.read_exact(&mut msg)?;
        let answer = match signing.choose_scheme(&[scheme]) {
            Some(s) => s.sign(&msg).map_err(|e| e.to_string()),
            None => Err(format!("{scheme:?} is not a scheme of this key")),
        };
        let (ok, body) = match answer {
            Ok(sig) => (1u8, sig),
            Err(e) => (0u8, e.into_bytes()),
        };
        let mut out = vec![ok];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        sock.write_all(&out)?;
    }
}

/// Nobody, no capabilities, no new privileges, and only the system calls
/// signing takes.
fn lock_down() -> anyhow::Result<()> {
    use crate::privileges::{CAP_SETGID, CAP_SETUID, CapSet, drop_own};
    const NOBODY: libc::uid_t = 65534;
    let dropping = |keep| drop_own(keep).map_err(|e| anyhow!("dropping capabilities: {e}"));
    // Everything but what changing user takes, the bounding set included;
    // then the user; then the rest. A signer started again after vpnd
    // dropped CAP_SETUID stays uid 0, with nothing else.
    dropping(CapSet::of(&[CAP_SETUID, CAP_SETGID]))?;
    // SAFETY: plain system calls on our own credentials.
    unsafe {
        if libc::getuid() == 0 {
            let _ = libc::setgroups(0, std::ptr::null());
            let _ = libc::setresgid(NOBODY, NOBODY, NOBODY);
            let _ = libc::setresuid(NOBODY, NOBODY, NOBODY);
        }
    }
    dropping(CapSet(0))?;
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!("no_new_privs: {}", std::io::Error::last_os_error());
    }
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let allowed = [
        libc::SYS_read,
        libc::SYS_write,
        // std's socket reads are recv(2), recvfrom on some libcs.
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_sched_yield,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
    ];
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow!("seccomp on {}: {e:?}", std::env::consts::ARCH))?;
    let filter = SeccompFilter::new(
        allowed.iter().map(|s| (*s, Vec::new())).collect(),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| anyhow!("the seccomp filter: {e}"))?;
    let prog: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e| anyhow!("the seccomp filter: {e:?}"))?;
    seccompiler::apply_filter(&prog).map_err(|e| anyhow!("applying the seccomp filter: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_info_reads_back() {
        let info = KeyInfo {
            algorithm: SignatureAlgorithm::ECDSA,
            schemes: vec![SignatureScheme::ECDSA_NISTP256_SHA256],
            spki: vec![1, 2, 3],
        };
        let mut b = Vec::new();
        info.write(&mut b).unwrap();
        assert_eq!(KeyInfo::read(&mut &b[..]).unwrap(), info);
        assert!(KeyInfo::read(&mut &b[..3]).is_err());
    }
}
