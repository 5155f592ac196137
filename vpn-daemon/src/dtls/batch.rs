//! Batched UDP I/O: one `recvmmsg` fills up to [`BATCH`] datagrams, one
//! `sendmmsg` sends up to [`BATCH`] records. Buffers are allocated once and
//! reused; a datagram is processed where it landed.

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

/// Receive side: [`BATCH`] slots of [`SLOT`] bytes.
pub struct RecvBatch {
    buf: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0; BATCH * SLOT],
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
        }
        Ok(self.n)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i`: its source and bytes (`None` if truncated or from an
    /// address family we do not speak).
    pub fn get_mut(&mut self, i: usize) -> Option<(SocketAddr, &mut [u8])> {
        if i >= self.n || self.truncated[i] {
            return None;
        }
        let from = to_socket_addr(&self.addrs[i])?;
        let len = self.lens[i];
        Some((from, &mut self.buf[i * SLOT..i * SLOT + len]))
    }
}

/// Send side: records built in place in [`BATCH`] slots, then sent at once.
pub struct SendBatch {
    buf: Vec<u8>,
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    lens: Vec<usize>,
    n: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            buf: vec![0; BATCH * SLOT],
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

    /// Commits the record of `len` bytes built in [`Self::slot`], for `to`.
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        self.addrs[self.n] = from_socket_addr(to);
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
        let to = b.local_addr().unwrap();
        let mut out = SendBatch::default();
        for i in 0..5u8 {
            out.slot()[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to);
        }
        assert_eq!(out.flush(a.as_raw_fd()), 5);
        assert!(out.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut inb = RecvBatch::default();
        assert_eq!(inb.recv(b.as_raw_fd()).unwrap(), 5);
        for i in 0..5 {
            let (from, d) = inb.get_mut(i).unwrap();
            assert_eq!(from, a.local_addr().unwrap());
            assert_eq!(d, &[i as u8; 3]);
        }
        assert_eq!(
            inb.recv(b.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
