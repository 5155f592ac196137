//! Batched UDP I/O: one `recvmmsg` fills up to [`BATCH`] datagrams, one
//! `sendmmsg` sends up to [`BATCH`] records. Buffers are allocated once and
//! reused; a datagram is processed where it landed.
//!
//! The socket may be bound to a wildcard address on a router with several
//! uplinks: each datagram's local address comes with it (`IP_PKTINFO`) and
//! answers leave from that same address, so source-based routing sends them
//! back through the uplink the client used.

use std::{
    io,
    mem::MaybeUninit,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::RawFd,
};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Room per datagram: a jumbo-frame record and then some; longer ones are
/// truncated by the kernel and dropped here.
pub const SLOT: usize = 9216;

/// Control-message room per datagram (one in6_pktinfo and then some).
const CTRL: usize = 64;

/// Asks the kernel for each datagram's local address (both families; the
/// one that does not apply fails harmlessly).
pub fn enable_pktinfo(fd: RawFd) {
    let on: libc::c_int = 1;
    for (level, name) in [
        (libc::IPPROTO_IP, libc::IP_PKTINFO),
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    ] {
        // SAFETY: a plain setsockopt with an int argument.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
    }
}

/// The local address in a received message's control data.
fn local_addr(h: &libc::msghdr) -> Option<std::net::IpAddr> {
    // SAFETY: walking control messages the kernel wrote into our buffer,
    // with the libc macros that bound them by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data as *const libc::in_pktinfo);
                    return Some(std::net::IpAddr::V4(
                        u32::from_be(pi.ipi_addr.s_addr).into(),
                    ));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data as *const libc::in6_pktinfo);
                    let a = std::net::Ipv6Addr::from(pi.ipi6_addr.s6_addr);
                    return Some(match a.to_ipv4_mapped() {
                        Some(v4) => std::net::IpAddr::V4(v4),
                        None => std::net::IpAddr::V6(a),
                    });
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Writes a source-address control message for `from` into `ctrl`;
/// returns its length (0 = none).
fn source_cmsg(ctrl: &mut [u8; CTRL], from: Option<std::net::IpAddr>, h: &mut libc::msghdr) {
    let Some(from) = from else {
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        return;
    };
    *ctrl = [0; CTRL];
    h.msg_control = ctrl.as_mut_ptr().cast();
    // SAFETY: CTRL bytes hold one cmsg of either pktinfo size; the macros
    // compute offsets within it.
    unsafe {
        match from {
            std::net::IpAddr::V4(a) => {
                h.msg_controllen = libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in_pktinfo, pi);
            }
            std::net::IpAddr::V6(a) => {
                h.msg_controllen = libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, pi);
            }
        }
    }
}

/// Sends one datagram to `to` from local address `from` (if given).
pub fn send_one(fd: RawFd, buf: &[u8], to: SocketAddr, from: Option<std::net::IpAddr>) {
    let (mut addr, alen) = from_socket_addr(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    };
    let mut ctrl = [0u8; CTRL];
    // SAFETY: zeroed msghdr, then pointers into locals alive for the call.
    unsafe {
        let mut h: libc::msghdr = MaybeUninit::zeroed().assume_init();
        h.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = alen;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        source_cmsg(&mut ctrl, from, &mut h);
        libc::sendmsg(fd, &h, libc::MSG_DONTWAIT);
    }
}

/// Receive side: [`BATCH`] slots of [`SLOT`] bytes.
pub struct RecvBatch {
    buf: Vec<u8>,
    ctrl: Vec<[u8; CTRL]>,
    local: Vec<Option<std::net::IpAddr>>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0; BATCH * SLOT],
            ctrl: vec![[0; CTRL]; BATCH],
            local: vec![None; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            lens: vec![0; BATCH],
            truncated: vec![false; BATCH],
            n: 0,
        }
    }
}

impl RecvBatch {
    /// Receives what is queued on the non-blocking socket `fd` (at least
    /// one datagram, or `WouldBlock`).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: [libc::iovec; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for i in 0..BATCH {
            iov[i] = libc::iovec {
                iov_base: self.buf[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = CTRL as _;
        }
        // SAFETY: every pointer refers to memory owned by `self` or this
        // frame, sized as declared, alive for the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = r as usize;
        for (i, h) in hdrs.iter().enumerate().take(self.n) {
            self.lens[i] = h.msg_len as usize;
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.local[i] = local_addr(&h.msg_hdr);
        }
        Ok(self.n)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i`: its source, the local address it was sent to, and its
    /// bytes (`None` if truncated or from an address family we do not
    /// speak).
    pub fn get_mut(
        &mut self,
        i: usize,
    ) -> Option<(SocketAddr, Option<std::net::IpAddr>, &mut [u8])> {
        if i >= self.n || self.truncated[i] {
            return None;
        }
        let from = to_socket_addr(&self.addrs[i])?;
        let len = self.lens[i];
        Some((from, self.local[i], &mut self.buf[i * SLOT..i * SLOT + len]))
    }
}

/// Send side: records built in place in [`BATCH`] slots, then sent at once.
pub struct SendBatch {
    buf: Vec<u8>,
    ctrl: Vec<[u8; CTRL]>,
    sources: Vec<Option<std::net::IpAddr>>,
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    lens: Vec<usize>,
    n: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            buf: vec![0; BATCH * SLOT],
            ctrl: vec![[0; CTRL]; BATCH],
            sources: vec![None; BATCH],
            addrs: vec![(unsafe { MaybeUninit::zeroed().assume_init() }, 0); BATCH],
            lens: vec![0; BATCH],
            n: 0,
        }
    }
}

impl SendBatch {
    pub fn is_full(&self) -> bool {
        self.n == BATCH
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The next free slot, to build a record in.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.n;
        &mut self.buf[i * SLOT..(i + 1) * SLOT]
    }

    /// Commits the record of `len` bytes built in [`Self::slot`], for `to`,
    /// sent from local address `from` (if given).
    pub fn commit(&mut self, len: usize, to: SocketAddr, from: Option<std::net::IpAddr>) {
        self.addrs[self.n] = from_socket_addr(to);
        self.sources[self.n] = from;
        self.lens[self.n] = len;
        self.n += 1;
    }

    /// Sends everything committed on the non-blocking socket `fd`. What the
    /// socket buffer cannot take is dropped, as the network would. Returns
    /// the number of datagrams sent.
    pub fn flush(&mut self, fd: RawFd) -> usize {
        let mut sent = 0;
        while sent < self.n {
            let mut iov: [libc::iovec; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
            let count = self.n - sent;
            for j in 0..count {
                let i = sent + j;
                iov[j] = libc::iovec {
                    iov_base: self.buf[i * SLOT..].as_mut_ptr().cast(),
                    iov_len: self.lens[i],
                };
                hdrs[j].msg_hdr.msg_name =
                    (&mut self.addrs[i].0 as *mut libc::sockaddr_storage).cast();
                hdrs[j].msg_hdr.msg_namelen = self.addrs[i].1;
                hdrs[j].msg_hdr.msg_iov = &mut iov[j];
                hdrs[j].msg_hdr.msg_iovlen = 1;
                source_cmsg(&mut self.ctrl[i], self.sources[i], &mut hdrs[j].msg_hdr);
            }
            // SAFETY: as in `RecvBatch::recv`.
            let r =
                unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), count as u32, libc::MSG_DONTWAIT) };
            if r <= 0 {
                // Full buffer or an error for the first datagram: skip it.
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
        let done = self.n;
        self.n = 0;
        done
    }
}

fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(a.sin_addr.s_addr).into(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn from_socket_addr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s2 = socket2::SockAddr::from(a);
    // SAFETY: SockAddr holds a valid sockaddr of `len` bytes within a
    // sockaddr_storage.
    let storage = unsafe { *(s2.as_ptr() as *const libc::sockaddr_storage) };
    (storage, s2.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_pktinfo(b.as_raw_fd());
        let to = b.local_addr().unwrap();
        let mut out = SendBatch::default();
        for i in 0..5u8 {
            out.slot()[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to, Some("127.0.0.1".parse().unwrap()));
        }
        assert_eq!(out.flush(a.as_raw_fd()), 5);
        assert!(out.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut inb = RecvBatch::default();
        assert_eq!(inb.recv(b.as_raw_fd()).unwrap(), 5);
        for i in 0..5 {
            let (from, local, d) = inb.get_mut(i).unwrap();
            assert_eq!(from, a.local_addr().unwrap());
            assert_eq!(local, Some("127.0.0.1".parse().unwrap()));
            assert_eq!(d, &[i as u8; 3]);
        }
        assert_eq!(
            inb.recv(b.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
