//! The kernel offloads the data path uses where the kernel has them,
//! decided once at start:
//!
//! - TSO and checksum offload on the TUN device (`TUNSETOFFLOAD`): the
//!   kernel hands over TCP packets of up to 64 KiB with partial checksums,
//!   and `packet/gso.rs` cuts them for the client. Without it, every read
//!   is one finished packet of at most the MTU.
//! - UDP GSO (`UDP_SEGMENT`, Linux 4.18): a run of equal-size DTLS records
//!   to one client goes to the kernel as one message. Without it, one
//!   message per datagram (still one `sendmmsg` per batch).
//! - UDP GRO (`UDP_GRO`, Linux 5.0): a client's consecutive datagrams come
//!   up as one message. Without it, one message per datagram.
//!
//! Each is probed on the running kernel; what it lacks, or what
//! `tunnel.offloads = false` turns off, is left out, and the start log
//! says which and why. The rest of the data path works the same either
//! way; only its cost per packet changes.

use std::{io, os::fd::AsRawFd};

pub use crate::api::Offloads;

/// Why an offload is off.
#[derive(Debug)]
pub enum Off {
    /// `tunnel.offloads = false`.
    Configured,
    /// The kernel refused it.
    Kernel(io::Error),
}

impl std::fmt::Display for Off {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Off::Configured => f.write_str("tunnel.offloads = false"),
            Off::Kernel(e) => write!(f, "the kernel refused it: {e}"),
        }
    }
}

/// UDP segmentation offload: a UDP socket answers `UDP_SEGMENT` (its
/// segment size, 0) on kernels that have it, and `ENOPROTOOPT` before.
pub fn probe_udp_gso() -> Result<(), Off> {
    let s = probe_socket()?;
    let mut size: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `size`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut size as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Off::Kernel(io::Error::last_os_error()))
    }
}

/// UDP receive offload: a UDP socket takes `UDP_GRO` on kernels that have
/// it (the DTLS sockets set it again for themselves).
pub fn probe_udp_gro() -> Result<(), Off> {
    let s = probe_socket()?;
    set_udp_gro(s.as_raw_fd()).map_err(Off::Kernel)
}

/// Asks the kernel to hand over a peer's consecutive datagrams on `fd` as
/// one message (UDP GRO, Linux 5.0): one trip through the stack and one
/// copy for up to 64 KiB instead of one per datagram. It applies where the
/// receiving device runs GRO (every NIC driver with NAPI; a veth with GRO
/// or XDP on); elsewhere datagrams arrive one by one as before.
pub fn set_udp_gro(fd: std::os::fd::RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt with an int argument.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn probe_socket() -> Result<std::net::UdpSocket, Off> {
    std::net::UdpSocket::bind("127.0.0.1:0").map_err(Off::Kernel)
}

impl Offloads {
    /// The offloads to use: `wanted` (`tunnel.offloads`) and the kernel's
    /// answer for the TUN device (`tun`) and for each UDP one; logs what
    /// is off and why.
    pub fn decide(wanted: bool, tun: Result<(), Off>) -> Self {
        let check = |r: Result<(), Off>| if wanted { r } else { Err(Off::Configured) };
        let tun_tso = check(tun);
        let udp_gso = check(probe_udp_gso());
        let udp_gro = check(probe_udp_gro());
        for (r, what, instead) in [
            (
                &tun_tso,
                "TUN TSO and checksum offload",
                "the TUN device hands over one finished packet per read",
            ),
            (&udp_gso, "UDP GSO", "DTLS sends one message per datagram"),
            (
                &udp_gro,
                "UDP GRO",
                "DTLS receives one message per datagram",
            ),
        ] {
            if let Err(why) = r {
                tracing::warn!("{what} off ({why}): {instead}");
            }
        }
        let o = Offloads {
            tun_tso: tun_tso.is_ok(),
            udp_gso: udp_gso.is_ok(),
            udp_gro: udp_gro.is_ok(),
        };
        tracing::info!("kernel offloads: {o}");
        o
    }
}

impl std::fmt::Display for Offloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "TUN TSO {}, UDP GSO {}, UDP GRO {}",
            on(self.tun_tso),
            on(self.udp_gso),
            on(self.udp_gro)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels this runs on (4.18 and later) have both UDP offloads;
    /// the probes must say so, or every DTLS send would go unbatched.
    #[test]
    fn this_kernel_has_the_udp_offloads() {
        assert!(probe_udp_gso().is_ok());
        assert!(probe_udp_gro().is_ok());
    }

    #[test]
    fn configured_off_turns_off_all_three() {
        let o = Offloads::decide(false, Ok(()));
        assert_eq!(
            o,
            Offloads {
                tun_tso: false,
                udp_gso: false,
                udp_gro: false
            }
        );
        assert_eq!(o.to_string(), "TUN TSO off, UDP GSO off, UDP GRO off");
        let o = Offloads::decide(true, Err(Off::Kernel(io::Error::from_raw_os_error(22))));
        assert!(!o.tun_tso && o.udp_gso && o.udp_gro);
    }
}
