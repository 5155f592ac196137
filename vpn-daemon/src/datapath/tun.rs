//! The TUN device: one layer-3 device for all sessions. The daemon writes
//! packets from clients into it and reads packets routed to clients from it.
//!
//! The device is multi-queue: each packet worker (`transport/workers.rs`) has a
//! queue, and the TLS tunnels one more, the last. The kernel sends a flow's
//! packets to the queue its packets were last written on (the TUN driver's
//! automatic steering), so whoever writes a client's uploads also reads its
//! downloads; flows never written spread over the queues by hash.
//!
//! Every packet read or written starts with a virtio-net header
//! ([`crate::packet::gro::VNET_HDR_LEN`] bytes, `IFF_VNET_HDR`): that is how merged
//! TCP segments are handed to the kernel for segmentation (`packet/gro.rs`), and
//! how the kernel hands us large TCP packets to segment (`packet/gso.rs`): the
//! device offers TSO and checksum offload (unless `tunnel.offloads` is off
//! or the kernel refuses, `datapath/offloads.rs`), so a read can return up
//! to 64 KiB ([`READ_MAX`]).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// The largest read: a virtio-net header and a 64 KiB packet.
pub const READ_MAX: usize = crate::packet::gro::VNET_HDR_LEN + 65_536;

/// `struct ifreq` as TUNSETIFF uses it: the name, then the flags in the
/// union, which is 24 bytes long.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// An open TUN device (non-blocking queues).
pub struct Tun {
    queues: Vec<File>,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) the TUN device `name` with `queues` queues
    /// (at least one). It disappears when the daemon exits, taking its
    /// addresses, routes and TC programs with it. `offload`: offer TSO and
    /// checksum offload, if the kernel takes them; returned with whether
    /// the device does, or why not.
    pub fn create(
        name: &str,
        queues: usize,
        offload: bool,
    ) -> io::Result<(Self, Result<(), super::offloads::Off>)> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        let queues = (0..queues.max(1))
            .map(|_| open_queue(name))
            .collect::<io::Result<Vec<_>>>()?;
        let offload = if offload {
            // Large TCP packets and partial checksums: `packet/gso.rs`
            // finishes them. A device setting: one queue sets it for all.
            let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
            // SAFETY: TUNSETOFFLOAD takes its flags as an integer argument.
            if unsafe { libc::ioctl(queues[0].as_raw_fd(), TUNSETOFFLOAD, flags) } < 0 {
                Err(super::offloads::Off::Kernel(io::Error::last_os_error()))
            } else {
                Ok(())
            }
        } else {
            Err(super::offloads::Off::Configured)
        };
        let tun = Tun {
            queues,
            name: name.to_owned(),
        };
        Ok((tun, offload))
    }

    /// The device `name` from queues another process opened (the
    /// broker's).
    pub fn from_queues(name: &str, queues: Vec<File>) -> io::Result<Self> {
        if queues.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no queues of TUN device {name}"),
            ));
        }
        Ok(Tun {
            queues,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many queues it has.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `q` (non-blocking): its data path thread polls and reads it.
    pub fn queue(&self, q: usize) -> &File {
        &self.queues[q]
    }

    /// Writes a packet with its virtio-net header (one `writev`) on queue
    /// `q`.
    pub fn send_parts_on(&self, q: usize, vnet: &[u8], pkt: &[u8]) -> io::Result<()> {
        writev(&self.queues[q], vnet, pkt)
    }

    /// The TLS tunnels' queue: the last.
    pub fn tls_queue(&self) -> usize {
        self.queues.len() - 1
    }

    /// Writes one packet on the TLS tunnels' queue. A TUN write is atomic,
    /// whole or not at all, and does not block: the device takes it or
    /// drops it, as an interface queue would.
    pub fn send(&self, pkt: &[u8]) -> io::Result<()> {
        let hdr = [0u8; crate::packet::gro::VNET_HDR_LEN];
        writev(&self.queues[self.tls_queue()], &hdr, pkt)
    }
}

/// Writes what a [`crate::packet::gro::Coalescer`] releases to a TUN queue. A
/// full device queue drops the packet, as an interface queue would.
pub struct TunSink<'a> {
    pub tun: &'a Tun,
    pub queue: usize,
}

impl<'a> TunSink<'a> {
    /// Writes on the TLS tunnels' queue.
    pub fn new(tun: &'a Tun) -> Self {
        TunSink {
            tun,
            queue: tun.tls_queue(),
        }
    }
}

impl crate::packet::gro::Sink for TunSink<'_> {
    fn write(&mut self, vnet: &[u8], pkt: &[u8]) {
        if let Err(e) = self.tun.send_parts_on(self.queue, vnet, pkt) {
            tracing::trace!("tun write: {e}");
        }
    }
}

/// One write of a virtio-net header and a packet (no copy).
fn writev(f: &File, hdr: &[u8], pkt: &[u8]) -> io::Result<()> {
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut _,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: pkt.as_ptr() as *mut _,
            iov_len: pkt.len(),
        },
    ];
    // SAFETY: both buffers outlive the call; the fd is open.
    let r = unsafe { libc::writev(f.as_raw_fd(), iov.as_ptr(), 2) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_queue(name: &str) -> io::Result<File> {
    // SAFETY: open() with a C string path; the result is checked below.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor open() just returned, owned by no one
    // else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; IfReq has its
    // layout (name[16], flags, padding to 40 bytes, checked at compile
    // time), and the name fits (config checks at most 15 bytes).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}
