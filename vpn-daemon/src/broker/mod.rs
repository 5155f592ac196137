//! Privilege separation: what needs privileges lives in a small process
//! of its own, the broker, and the process that parses what clients send
//! holds none.
//!
//! `vpnd` starts as root and runs itself again as `vpnd --broker CONFIG`
//! before it reads a byte from a client. The broker reads the
//! configuration itself and sets up everything that takes privileges:
//! the TUN device (its queues handed to vpnd over the socket with
//! `SCM_RIGHTS`), the tunnel's addresses and forwarding, the BPF programs
//! (loaded, attached, maps pinned), the XDP guards, and the uplinks
//! (routing tables, rules, the nft table, health probes on raw sockets,
//! failover). Then it keeps only `CAP_NET_ADMIN` and `CAP_BPF` (what
//! writing maps and managing uplinks takes), forbids the system calls it
//! never makes, and answers vpnd's requests: one typed request at a time
//! ([`Request`]), each one map change or read, the uplinks' state, or the
//! clean stop; the files the configuration names, which vpnd (serving as
//! nobody) cannot open itself; and a new key signer when vpnd's died.
//! That is the whole interface: vpnd cannot ask it to load a program,
//! open any other file, run a command, or touch a route.
//!
//! vpnd, once it has the broker's queues, its listening sockets and the
//! key signer (`transport/key_signer.rs`), drops every capability from
//! every thread, sets no-new-privileges and a seccomp filter, and only
//! then serves. A bug in TLS, HTTP, XML, CSTP or DTLS parsing then runs in
//! a process that can neither write a route nor a map directly, nor load
//! a program.
//!
//! The broker dies with vpnd (`PR_SET_PDEATHSIG`), so a vpnd killed at
//! any moment leaves what a crash always left (routes, rules, nft table,
//! pinned maps), which the next start removes; the broker takes a lock in
//! `server.state_dir` first, so a new one never sets up beside an old one
//! that is still going. If the broker dies under a running vpnd, vpnd
//! exits (the data path went with it) and its service manager restarts
//! it.

mod client;
mod server;

use std::{
    io::{self, Read, Write},
    net::IpAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::PathBuf,
    time::Duration,
};

pub use client::{Broker, BrokerFiles, RemoteDatapath, Started};
use serde::{Deserialize, Serialize};
pub use server::serve;
use vpn_common::{PolicyInfo, SessionInfo, SessionKey, SessionStats};

use crate::policy::Compiled;

/// The hidden `vpnd` option that makes it the broker.
pub const ARG: &str = "--broker";

/// The largest frame either side accepts (a large policy set compiles to
/// a few MiB of JSON).
const MAX_FRAME: usize = 64 << 20;

/// The most TUN queues the broker hands over.
const MAX_QUEUES: usize = 64;

/// What vpnd asks of the broker.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    AddSession {
        ip: IpAddr,
        info: SessionInfo,
        from: SessionStats,
    },
    RemoveSession {
        ip: IpAddr,
    },
    SetSession {
        ip: IpAddr,
        info: SessionInfo,
    },
    AllSessionStats,
    ForgetRateState {
        session_id: u64,
    },
    InstallPolicy {
        id: u32,
        info: PolicyInfo,
        compiled: Compiled,
        first_interval: u32,
    },
    RemovePolicy {
        id: u32,
        compiled: Compiled,
    },
    ResetHits {
        start: u32,
        end: u32,
    },
    RuleHits {
        start: u32,
        end: u32,
    },
    Drops,
    GuardDrops,
    Ban {
        net: ipnet::IpNet,
        time: Option<Duration>,
    },
    Unban {
        net: ipnet::IpNet,
    },
    /// The uplinks' health, roles and traffic (`vpnctl uplinks`).
    Uplinks,
    /// The web proxies' health (`vpnctl web-proxies`).
    WebProxies,
    /// A file the configuration names (`crate::files`): its bytes.
    ReadFile {
        path: PathBuf,
    },
    /// Its modification time.
    FileModified {
        path: PathBuf,
    },
    /// The saved sessions' file, replaced whole (base64).
    WriteFile {
        path: PathBuf,
        data: String,
    },
    /// A new key signer (`transport/key_signer.rs`) for vpnd, whose own
    /// failed: vpnd, serving as nobody, cannot read the key to start one.
    /// The reply is followed by the socket to it.
    StartKeySigner,
    /// The clean stop: unpin the maps, remove the uplinks' routes, rules
    /// and nft table, then exit.
    Stop,
}

/// The broker's answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Failed(String),
    Stats(SessionStats),
    Snapshot(Vec<(SessionKey, SessionStats)>),
    Counts(Vec<u64>),
    Uplinks(Vec<crate::api::UplinkRow>),
    WebProxies(Vec<crate::api::WebProxyRow>),
    /// The key signer started, its socket sent next.
    KeySigner {
        pid: u32,
    },
    /// A file's bytes (base64).
    File(String),
    Modified(std::time::SystemTime),
    /// A file request that failed: the error number when there is one.
    Io {
        errno: Option<i32>,
        message: String,
    },
}

/// What the broker sends once it has set up (with the TUN queues).
#[derive(Debug, Serialize, Deserialize)]
enum Setup {
    Ready {
        tun: String,
        /// Why the TUN device offers no TSO, if it does not.
        tun_offload: Option<OffloadOff>,
    },
    Failed(String),
}

#[derive(Debug, Serialize, Deserialize)]
enum OffloadOff {
    Configured,
    Kernel(String),
}

fn write_frame<T: Serialize>(s: &mut UnixStream, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame)
}

/// Reads one frame; `Ok(None)` at the end of the stream.
fn read_frame<T: for<'de> Deserialize<'de>>(s: &mut UnixStream) -> io::Result<Option<T>> {
    let mut head = [0u8; 4];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn one_byte(byte: &mut [u8; 1]) -> libc::iovec {
    libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    }
}

/// A `msghdr` of one buffer and a control buffer; valid as long as both
/// live.
fn message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is a valid value (null pointers, zero
    // lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

/// Sends `fds` with one byte of data (`SCM_RIGHTS`; just the byte when
/// there are none).
fn send_fds(s: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    if fds.is_empty() {
        return (&*s).write_all(&[0]);
    }
    let mut byte = [0u8; 1];
    let mut iov = one_byte(&mut byte);
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the sendmsg call, and the control buffer has CMSG_SPACE bytes for
    // one header with `fds`.
    unsafe {
        let msg = message(&mut iov, &mut control);
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        if libc::sendmsg(s.as_raw_fd(), &msg, 0) != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives the descriptors [`send_fds`] sent (at most `max`).
fn recv_fds(s: &UnixStream, max: usize) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = one_byte(&mut byte);
    // SAFETY: as in send_fds.
    let space = unsafe { libc::CMSG_SPACE((max * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut fds = Vec::new();
    // SAFETY: as in send_fds; the kernel writes at most `space` bytes of
    // control data, and each SCM_RIGHTS descriptor it wrote is ours to own.
    unsafe {
        let mut msg = message(&mut iov, &mut control);
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("more descriptors than expected"));
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, mut w) = UnixStream::pair().unwrap();
        send_fds(&a, &[r.as_raw_fd()]).unwrap();
        let got = recv_fds(&b, 4).unwrap();
        assert_eq!(got.len(), 1);
        let mut r2 = UnixStream::from(got.into_iter().next().unwrap());
        w.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        r2.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_frame(&mut a, &Request::RuleHits { start: 3, end: 9 }).unwrap();
        match read_frame::<Request>(&mut b).unwrap() {
            Some(Request::RuleHits { start: 3, end: 9 }) => {}
            other => panic!("{other:?}"),
        }
        a.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let e = read_frame::<Request>(&mut b).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        drop(a);
        assert!(read_frame::<Request>(&mut b).unwrap().is_none());
    }
}
