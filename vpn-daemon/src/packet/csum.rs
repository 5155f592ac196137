//! The Internet checksum (RFC 1071), fast enough for the data path: every
//! byte of every download is summed once when large packets from the TUN
//! device are cut into wire-size ones (see `gso.rs`).
//!
//! The one's-complement sum does not depend on byte order (RFC 1071 §2(B)),
//! so 32-bit words are summed in native order into a 64-bit accumulator
//! (which the compiler vectorises), folded, and swapped once at the end.

/// One's-complement sum of `d` plus `init` (a sum in network order, e.g.
/// a pseudo-header's), folded to 16 bits and not inverted: the checksum
/// field gets its complement.
pub fn checksum(d: &[u8], init: u32) -> u16 {
    let words = d.len() / 4 * 4;
    let mut acc: u64 = d[..words]
        .chunks_exact(4)
        .map(|w| u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .sum();
    let tail = &d[words..];
    if !tail.is_empty() {
        // An odd tail is padded with zero, as if the data were one byte
        // longer (RFC 1071).
        let mut w = [0u8; 4];
        w[..tail.len()].copy_from_slice(tail);
        acc += u64::from(u32::from_ne_bytes(w));
    }
    // 64 -> 32 -> 16 bits, carries folded back in.
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    let mut s = (acc & 0xffff) + (acc >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    // The sum of native-order words is the network-order sum byte-swapped
    // on little-endian hosts.
    let mut sum = u32::from(u16::from_be(s as u16)) + init;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The sum of an IPv4 or IPv6 pseudo-header (addresses, protocol, length),
/// in network order, for [`checksum`]'s `init`.
pub fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut s = u32::from(checksum(src, 0)) + u32::from(checksum(dst, 0));
    s += u32::from(proto);
    // IPv6 has a 32-bit length; ours are under 64 KiB.
    s += (len as u32 & 0xffff) + (len as u32 >> 16);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 word by word, the definition the fast one must match.
    fn reference(d: &[u8], init: u32) -> u16 {
        let mut sum = init;
        for c in d.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn matches_rfc1071_on_every_length_and_alignment() {
        // A fixed pseudo-random stream (xorshift), all lengths up to 600
        // and every start offset within a word.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for start in 0..4 {
            for len in 0..600 {
                let d = &data[start..start + len];
                for init in [0, 1, 0xffff, 0x1_fffe] {
                    assert_eq!(
                        checksum(d, init),
                        reference(d, init),
                        "len {len} init {init}"
                    );
                }
            }
        }
        // All ones: the sum of 0xffff words stays 0xffff.
        assert_eq!(checksum(&[0xff; 9000], 0), 0xffff);
        assert_eq!(checksum(&[], 0), 0);
    }

    #[test]
    fn known_header_checksum() {
        // An IPv4 header with its correct checksum (0xad8d, computed by
        // hand) sums to 0xffff.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xad, 0x8d, 198, 18, 0, 1,
            198, 18, 0, 199,
        ];
        assert_eq!(checksum(&h, 0), 0xffff);
        let mut z = h;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(!checksum(&z, 0), 0xad8d);
    }
}
