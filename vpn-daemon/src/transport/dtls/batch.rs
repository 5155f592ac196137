//! Batched UDP I/O: one `recvmmsg` fills up to [`RECV_BATCH`] messages, one
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

/// Records per `sendmmsg`. More would make the bursts towards one client
/// longer than its socket takes (see `flow_control.rs`).
pub const BATCH: usize = 32;
/// Messages per `recvmmsg` at most. During an upload a packet worker
/// waits for a batch to gather (`rx_coalesce_usecs`); 64 rather than 32
/// lets it take what 200 us bring at 1.5 Gbit/s in one call and one merged
/// tunnel write (bench, DTLS upload, 7 alternating runs: 2.10 vs 2.3-2.9
/// CPU s/GB). Memory is reserved, not touched, beyond what arrives.
pub const RECV_BATCH: usize = 64;
/// Room per datagram: a jumbo-frame record and then some; longer ones are
/// truncated by the kernel and dropped here.
pub const SLOT: usize = 9216;
/// Room per received message: with UDP GRO one message carries up to
/// 64 KiB of a peer's consecutive datagrams.
const RECV_SLOT: usize = 65536;

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

/// UDP GRO on `fd` (`datapath/offloads.rs`); a kernel without it leaves
/// datagrams one per message, as before.
pub fn enable_gro(fd: RawFd) {
    let _ = crate::datapath::offloads::set_udp_gro(fd);
}

/// From a received message's control data: the local address it was sent
/// to, and the datagram size if GRO merged several.
fn control_info(h: &libc::msghdr) -> (Option<std::net::IpAddr>, Option<usize>) {
    let (mut local, mut seg) = (None, None);
    // SAFETY: walking control messages the kernel wrote into our buffer,
    // with the libc macros that bound them by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data as *const libc::in_pktinfo);
                    local = Some(std::net::IpAddr::V4(
                        u32::from_be(pi.ipi_addr.s_addr).into(),
                    ));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data as *const libc::in6_pktinfo);
                    let a = std::net::Ipv6Addr::from(pi.ipi6_addr.s6_addr);
                    local = Some(match a.to_ipv4_mapped() {
                        Some(v4) => std::net::IpAddr::V4(v4),
                        None => std::net::IpAddr::V6(a),
                    });
                }
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    let size = std::ptr::read_unaligned(data as *const libc::c_int);
                    seg = usize::try_from(size).ok().filter(|&s| s > 0);
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    (local, seg)
}

/// Fills `h`'s control data in `ctrl`: the source address `from` (if
/// given) and a UDP segment size `gso` (if given: the message's payload is
/// sent as datagrams of that size, the last one possibly shorter).
fn control(
    ctrl: &mut [u8; CTRL],
    from: Option<std::net::IpAddr>,
    gso: Option<u16>,
    h: &mut libc::msghdr,
) {
    let pi_len = match from {
        None => 0,
        Some(std::net::IpAddr::V4(_)) => size_of::<libc::in_pktinfo>(),
        Some(std::net::IpAddr::V6(_)) => size_of::<libc::in6_pktinfo>(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe {
        (if from.is_some() {
            libc::CMSG_SPACE(pi_len as u32)
        } else {
            0
        }) + (if gso.is_some() {
            libc::CMSG_SPACE(2)
        } else {
            0
        })
    } as usize;
    if space == 0 {
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        return;
    }
    *ctrl = [0; CTRL];
    h.msg_control = ctrl.as_mut_ptr().cast();
    h.msg_controllen = space as _;
    // SAFETY: `space` <= CTRL bytes (checked by the sizes above: at most
    // 40 + 16); the macros walk within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        match from {
            Some(std::net::IpAddr::V4(a)) => {
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(pi_len as u32) as _;
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in_pktinfo, pi);
                c = libc::CMSG_NXTHDR(h, c);
            }
            Some(std::net::IpAddr::V6(a)) => {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(pi_len as u32) as _;
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, pi);
                c = libc::CMSG_NXTHDR(h, c);
            }
            None => {}
        }
        if let Some(size) = gso {
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, size);
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
        control(&mut ctrl, from, None, &mut h);
        libc::sendmsg(fd, &h, libc::MSG_DONTWAIT);
    }
}

/// Receive side: [`RECV_BATCH`] messages of up to 64 KiB (a datagram, or a
/// peer's consecutive datagrams merged by GRO).
pub struct RecvBatch {
    buf: Vec<u8>,
    ctrl: Vec<[u8; CTRL]>,
    local: Vec<Option<std::net::IpAddr>>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    /// Datagram size within a merged message (`None`: one datagram).
    segs: Vec<Option<usize>>,
    truncated: Vec<bool>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0; RECV_BATCH * RECV_SLOT],
            ctrl: vec![[0; CTRL]; RECV_BATCH],
            local: vec![None; RECV_BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; RECV_BATCH],
            lens: vec![0; RECV_BATCH],
            segs: vec![None; RECV_BATCH],
            truncated: vec![false; RECV_BATCH],
            n: 0,
        }
    }
}

impl RecvBatch {
    /// Takes what is queued on `fd` without waiting, at most `max`
    /// messages (up to [`RECV_BATCH`]); an empty queue is `WouldBlock`.
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let max = max.min(RECV_BATCH);
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers,
        // zero lengths); the ones recvmmsg gets are filled below.
        let mut iov: [libc::iovec; RECV_BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for i in 0..max {
            iov[i] = libc::iovec {
                iov_base: self.buf[i * RECV_SLOT..].as_mut_ptr().cast(),
                iov_len: RECV_SLOT,
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
                max as u32,
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
            (self.local[i], self.segs[i]) = control_info(&h.msg_hdr);
        }
        Ok(self.n)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes received in this batch.
    pub fn bytes(&self) -> usize {
        self.lens[..self.n].iter().sum()
    }

    /// Message `i`: its source, the local address it was sent to, its
    /// bytes, and the size of the datagrams in it (all but the last of a
    /// merged message have that size). `None` if truncated or from an
    /// address family we do not speak.
    pub fn get_mut(
        &mut self,
        i: usize,
    ) -> Option<(SocketAddr, Option<std::net::IpAddr>, &mut [u8], usize)> {
        if i >= self.n || self.truncated[i] {
            return None;
        }
        let from = to_socket_addr(&self.addrs[i])?;
        let len = self.lens[i];
        let seg = self.segs[i].unwrap_or(len).max(1);
        let d = &mut self.buf[i * RECV_SLOT..i * RECV_SLOT + len];
        Some((from, self.local[i], d, seg))
    }
}

/// Send side: records built in place in [`BATCH`] slots, then sent at once.
pub struct SendBatch {
    /// UDP segmentation offload for runs of equal-size records, unless the
    /// path refused it (`EIO`).
    gso: bool,
    /// Messages of several datagrams handed over with UDP GSO, since the
    /// owner last took the count.
    pub gso_messages: u64,
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
            gso: true,
            gso_messages: 0,
            buf: vec![0; BATCH * SLOT],
            ctrl: vec![[0; CTRL]; BATCH],
            sources: vec![None; BATCH],
            // SAFETY: all-zero is a valid sockaddr_storage (family 0).
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

    /// Sends everything committed on the non-blocking socket `fd`. Runs of
    /// equal-size records to the same peer go out as one message with UDP
    /// segmentation offload (one trip through the stack for the run, cut
    /// into datagrams late); what the socket buffer cannot take is dropped,
    /// as the network would. `gso`: the kernel has UDP GSO and it is on
    /// (`datapath/offloads.rs`); without it, one message per datagram.
    /// Returns the number of datagrams handed over.
    pub fn flush(&mut self, fd: RawFd, gso: bool) -> usize {
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers,
        // zero lengths); the ones sendmmsg gets are filled below.
        let mut iov: [libc::iovec; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        // Message k covers datagrams starts[k]..starts[k + 1].
        let mut starts = [0usize; BATCH + 1];
        let mut msgs = 0;
        let mut i = 0;
        while i < self.n {
            let mut j = i + 1;
            let mut bytes = self.lens[i];
            if gso && self.gso {
                while j < self.n
                    && self.lens[j - 1] == self.lens[i]
                    && self.lens[j] <= self.lens[i]
                    && self.sources[j] == self.sources[i]
                    && same_addr(&self.addrs[j], &self.addrs[i])
                    && bytes + self.lens[j] <= GSO_MAX_BYTES
                {
                    bytes += self.lens[j];
                    j += 1;
                }
            }
            for (d, slot) in (i..j).enumerate() {
                iov[i + d] = libc::iovec {
                    iov_base: self.buf[slot * SLOT..].as_mut_ptr().cast(),
                    iov_len: self.lens[slot],
                };
            }
            let h = &mut hdrs[msgs].msg_hdr;
            h.msg_name = (&mut self.addrs[i].0 as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.addrs[i].1;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = j - i;
            let gso = (j - i > 1).then_some(self.lens[i] as u16);
            control(&mut self.ctrl[msgs], self.sources[i], gso, h);
            starts[msgs] = i;
            msgs += 1;
            i = j;
        }
        starts[msgs] = self.n;
        let mut sent = 0;
        while sent < msgs {
            // SAFETY: as in `RecvBatch::recv`.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    hdrs[sent..].as_mut_ptr(),
                    (msgs - sent) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                // A path without segmentation offload: send one by one from
                // here on.
                if self.gso
                    && starts[sent + 1] - starts[sent] > 1
                    && e.raw_os_error() == Some(libc::EIO)
                {
                    self.gso = false;
                    let from = starts[sent];
                    let rest = self.n;
                    self.compact(from, rest);
                    return from + self.flush(fd, false);
                }
                // Full buffer or an error for this message: skip it.
                sent += 1;
                continue;
            }
            let accepted = sent..sent + r as usize;
            self.gso_messages += accepted.filter(|&k| starts[k + 1] - starts[k] > 1).count() as u64;
            sent += r as usize;
        }
        let done = self.n;
        self.n = 0;
        done
    }

    /// Keeps datagrams `from..to` only (moved to the front).
    fn compact(&mut self, from: usize, to: usize) {
        for (d, i) in (from..to).enumerate() {
            self.buf
                .copy_within(i * SLOT..i * SLOT + self.lens[i], d * SLOT);
            self.addrs[d] = self.addrs[i];
            self.lens[d] = self.lens[i];
            self.sources[d] = self.sources[i];
        }
        self.n = to - from;
    }
}

/// A run sent with segmentation offload stays under the 64 KiB UDP limit.
const GSO_MAX_BYTES: usize = 65_000;

fn same_addr(
    a: &(libc::sockaddr_storage, libc::socklen_t),
    b: &(libc::sockaddr_storage, libc::socklen_t),
) -> bool {
    a.1 == b.1 && to_socket_addr(&a.0) == to_socket_addr(&b.0)
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

    /// A sender and a non-blocking receiver (set up by `option`) on
    /// loopback, and the receiver's address.
    fn loopback_pair(option: fn(RawFd)) -> (std::net::UdpSocket, std::net::UdpSocket, SocketAddr) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        option(b.as_raw_fd());
        b.set_nonblocking(true).unwrap();
        let to = b.local_addr().unwrap();
        (a, b, to)
    }

    #[test]
    fn batch_round_trip_over_loopback() {
        let (a, b, to) = loopback_pair(enable_pktinfo);
        let mut out = SendBatch::default();
        // Equal sizes (one segmented run), then a shorter last one.
        for i in 0..5u8 {
            let n = if i == 4 { 2 } else { 3 };
            out.slot()[..n].copy_from_slice(&[i, i, i][..n]);
            out.commit(n, to, Some("127.0.0.1".parse().unwrap()));
        }
        assert_eq!(out.flush(a.as_raw_fd(), true), 5);
        assert!(out.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut inb = RecvBatch::default();
        assert_eq!(inb.recv(b.as_raw_fd(), RECV_BATCH).unwrap(), 5);
        for i in 0..5 {
            let (from, local, d, seg) = inb.get_mut(i).unwrap();
            assert_eq!(seg, d.len(), "loopback does not merge");
            assert_eq!(from, a.local_addr().unwrap());
            assert_eq!(local, Some("127.0.0.1".parse().unwrap()));
            let n = if i == 4 { 2 } else { 3 };
            assert_eq!(d, &[i as u8; 3][..n], "datagram {i} kept its bounds");
        }
        assert_eq!(
            inb.recv(b.as_raw_fd(), RECV_BATCH).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn merged_datagrams_come_with_their_size() {
        // A segmented send reaches a GRO socket as one message (as NIC GRO
        // would merge a burst); the datagram size comes with it.
        let (a, b, to) = loopback_pair(enable_gro);
        let mut out = SendBatch::default();
        for i in 0..4u8 {
            let n = if i == 3 { 40 } else { 100 };
            out.slot()[..n].fill(i);
            out.commit(n, to, None);
        }
        assert_eq!(out.flush(a.as_raw_fd(), true), 4);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut inb = RecvBatch::default();
        assert_eq!(
            inb.recv(b.as_raw_fd(), RECV_BATCH).unwrap(),
            1,
            "one message"
        );
        let (from, _, d, seg) = inb.get_mut(0).unwrap();
        assert_eq!(from, a.local_addr().unwrap());
        assert_eq!((d.len(), seg), (340, 100));
        let parts: Vec<&mut [u8]> = d.chunks_mut(seg).collect();
        assert_eq!(parts.len(), 4);
        for (i, p) in parts.iter().enumerate() {
            assert!(p.iter().all(|&x| x == i as u8), "datagram {i} intact");
        }
        assert_eq!(out.gso_messages, 1);
    }

    #[test]
    fn without_gso_each_datagram_is_a_message_of_its_own() {
        // UDP GSO off (`tunnel.offloads = false`, or a kernel without it):
        // the same run goes out, one message per datagram.
        let (a, b, to) = loopback_pair(enable_gro);
        let mut out = SendBatch::default();
        for i in 0..4u8 {
            out.slot()[..100].fill(i);
            out.commit(100, to, None);
        }
        assert_eq!(out.flush(a.as_raw_fd(), false), 4);
        assert_eq!(out.gso_messages, 0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut inb = RecvBatch::default();
        // Loopback GRO merges only what came as one segmented message.
        assert_eq!(inb.recv(b.as_raw_fd(), RECV_BATCH).unwrap(), 4);
        for i in 0..4 {
            let (_, _, d, seg) = inb.get_mut(i).unwrap();
            assert_eq!((d.len(), seg), (100, 100));
            assert!(d.iter().all(|&x| x == i as u8));
        }
    }
}
