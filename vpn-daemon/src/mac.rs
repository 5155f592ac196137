//! The pseudo-MAC shown for each client: a locally administered unicast MAC
//! derived from the user name, so the same user has the same MAC every time
//! (as Meraki's client list shows AnyConnect users).

use sha2::{Digest, Sha256};

/// The pseudo-MAC of `user`: the first six bytes of SHA-256("vpn-gateway
/// pseudo-mac" || user) with the locally-administered bit set and the
/// multicast bit cleared.
pub fn pseudo_mac(user: &str) -> [u8; 6] {
    let h = Sha256::new()
        .chain_update(b"vpn-gateway pseudo-mac\0")
        .chain_update(user.as_bytes())
        .finalize();
    let mut m = [0u8; 6];
    m.copy_from_slice(&h[..6]);
    m[0] = (m[0] & 0xfc) | 0x02;
    m
}

/// `02:ab:...` form.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_local_unicast() {
        let a = pseudo_mac("alice");
        assert_eq!(a, pseudo_mac("alice"));
        assert_ne!(a, pseudo_mac("bob"));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(format_mac(&[2, 0, 0xab, 1, 2, 3]), "02:00:ab:01:02:03");
    }
}
