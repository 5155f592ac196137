//! CONNECT negotiation, without I/O: what the client's `CONNECT` asks for
//! (its DTLS offer, IPv6, base MTU) and what the gateway pushes (from
//! [`TunnelParams`]) make the response head that configures the client.
//! Header names are written in the exact case openconnect matches
//! (the shared protocol notes, §4-5).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;

use super::http::Request;

/// Per-record overhead of DTLS 1.2 with an AES-GCM suite: 13-byte header,
/// 8-byte explicit nonce, 16-byte tag (RFC 6347 §4.1, RFC 5288), plus the
/// CSTP type byte.
pub const DTLS_GCM_OVERHEAD: u16 = 13 + 8 + 16 + 1;

/// How the client routes traffic, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    All,
    Include(Vec<IpNet>),
    Exclude(Vec<IpNet>),
}

/// What the gateway pushes to every client, from its configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelParams {
    /// The tunnel MTU (`tunnel.mtu`).
    pub mtu: u16,
    /// The IPv4 pool's netmask.
    pub netmask_v4: Ipv4Addr,
    /// The IPv6 pool's prefix length, when there is one.
    pub prefix_v6: Option<u8>,
    pub dns: Vec<IpAddr>,
    pub default_domain: Option<String>,
    pub banner: Option<String>,
    pub local_lan_access: bool,
    pub routing: Routing,
    pub session_timeout: Duration,
    /// 0 = none.
    pub idle_timeout_secs: u64,
    pub disconnected_timeout_secs: u64,
    pub dpd_secs: u64,
    pub keepalive_secs: u64,
    /// A proxy auto-config URL (the session's policy's).
    pub proxy_pac: Option<String>,
}

/// The session's part of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// A DTLS 1.2 suite we resume in Cisco mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeSuite {
    /// OpenSSL's name, which is also Cisco's `X-DTLS12-CipherSuite` name.
    pub name: &'static str,
    /// The IANA id.
    pub id: [u8; 2],
}

/// Cisco DTLS 1.2 suites we resume, strongest first. Only names taken from
/// the client's own list are ever answered.
pub const DTLS12_SUITES: [ResumeSuite; 4] = [
    ResumeSuite {
        name: "ECDHE-RSA-AES256-GCM-SHA384",
        id: [0xc0, 0x30],
    },
    ResumeSuite {
        name: "AES256-GCM-SHA384",
        id: [0x00, 0x9d],
    },
    ResumeSuite {
        name: "ECDHE-RSA-AES128-GCM-SHA256",
        id: [0xc0, 0x2f],
    },
    ResumeSuite {
        name: "AES128-GCM-SHA256",
        id: [0x00, 0x9c],
    },
];

/// The strongest suite both sides support, from an `X-DTLS12-CipherSuite`
/// offer.
pub fn pick_dtls12_suite(offer: &str) -> Option<ResumeSuite> {
    DTLS12_SUITES
        .iter()
        .find(|s| offer.split(':').any(|c| c.trim() == s.name))
        .copied()
}

/// openconnect's own names for DTLS 1.2 resumption in
/// `X-DTLS-CipherSuite`, strongest first, with the suite each stands for
/// (the shared protocol notes §5.4; ocserv answers them the same way).
///
/// Its other legacy names there (`AES128-SHA`, `AES256-SHA`,
/// `DES-CBC3-SHA`, the `DHE-` ones) mean Cisco's pre-standard DTLS 0.9,
/// which OpenSSL implements only as a client (its `DTLS1_BAD_VER` method
/// has no server side), so a client offering only those stays on TLS.
pub const LEGACY_DTLS12_NAMES: [(&str, ResumeSuite); 2] = [
    ("OC-DTLS1_2-AES256-GCM", DTLS12_SUITES[1]),
    ("OC-DTLS1_2-AES128-GCM", DTLS12_SUITES[3]),
];

/// The strongest of openconnect's legacy DTLS 1.2 names in an
/// `X-DTLS-CipherSuite` offer, and its suite.
pub fn pick_legacy_suite(offer: &str) -> Option<(&'static str, ResumeSuite)> {
    LEGACY_DTLS12_NAMES
        .iter()
        .find(|(name, _)| offer.split(':').any(|c| c.trim() == *name))
        .copied()
}

/// The DTLS mode a client's offer gets, before it is registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtlsChoice {
    /// PSK-NEGOTIATE: the key is the TLS connection's exporter.
    Psk,
    /// Session resumption with the client's master secret, in `suite`,
    /// announced in `header` (the one the suite's name came from) as
    /// `name`.
    Resume {
        master: [u8; 48],
        header: &'static str,
        name: &'static str,
        suite: ResumeSuite,
    },
}

/// Why a tunnel gets no DTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoDtls {
    #[error("the client asks for none (no X-DTLS-Master-Secret)")]
    NotAsked,
    #[error(
        "the client offers no DTLS suite the gateway does (PSK-NEGOTIATE, AES-GCM in DTLS 1.2)"
    )]
    NoCommonSuite,
}

/// The DTLS mode for a client's `CONNECT`: PSK-NEGOTIATE when it offers
/// it and `psk_negotiate` allows, else Cisco resumption with the strongest
/// suite of its `X-DTLS12-CipherSuite` list, else of openconnect's legacy
/// names in `X-DTLS-CipherSuite` (the shared protocol notes, §5.2, §5.4).
pub fn choose_dtls(req: &Request, psk_negotiate: bool) -> Result<DtlsChoice, NoDtls> {
    if psk_negotiate && offers_psk_negotiate(req) {
        return Ok(DtlsChoice::Psk);
    }
    let master: [u8; 48] = req
        .header("X-DTLS-Master-Secret")
        .and_then(|m| hex::decode(m).ok())
        .and_then(|m| m.try_into().ok())
        .ok_or(NoDtls::NotAsked)?;
    if let Some(s) = req
        .header("X-DTLS12-CipherSuite")
        .and_then(pick_dtls12_suite)
    {
        return Ok(DtlsChoice::Resume {
            master,
            header: "X-DTLS12-CipherSuite",
            name: s.name,
            suite: s,
        });
    }
    let (name, suite) = req
        .header("X-DTLS-CipherSuite")
        .and_then(pick_legacy_suite)
        .ok_or(NoDtls::NoCommonSuite)?;
    Ok(DtlsChoice::Resume {
        master,
        header: "X-DTLS-CipherSuite",
        name,
        suite,
    })
}

/// The DTLS mode chosen for a tunnel, as announced in the CONNECT answer.
pub enum DtlsAnswer {
    Psk {
        port: u16,
        app_id: [u8; 32],
    },
    Resume {
        port: u16,
        sid: [u8; 32],
        /// `X-DTLS12-CipherSuite` (Cisco) or `X-DTLS-CipherSuite`
        /// (openconnect's legacy names): where the suite came from.
        header: &'static str,
        /// The suite's name as the client gave it.
        name: &'static str,
    },
}

impl DtlsAnswer {
    /// The id a ClientHello carries in this mode.
    pub fn id(&self) -> &[u8; 32] {
        match self {
            DtlsAnswer::Psk { app_id, .. } => app_id,
            DtlsAnswer::Resume { sid, .. } => sid,
        }
    }
}

/// The head of the `CONNECT` answer: every header that configures the
/// client. `remaining` is what is left of the session's time; `peer_v6`
/// whether the client's outer address is IPv6 (the DTLS MTU's overhead).
pub fn response_head(
    p: &TunnelParams,
    req: &Request,
    addrs: Addresses,
    remaining: Duration,
    peer_v6: bool,
    dtls: Option<&DtlsAnswer>,
) -> String {
    let mut h: Vec<(&str, String)> = Vec::with_capacity(32);
    h.push(("X-CSTP-Version", "1".into()));
    h.push((
        "X-CSTP-Server-Name",
        format!("vpn-gateway {}", env!("CARGO_PKG_VERSION")),
    ));
    h.push(("X-CSTP-Address", addrs.v4.to_string()));
    h.push(("X-CSTP-Netmask", p.netmask_v4.to_string()));
    let wants_v6 = req
        .header("X-CSTP-Address-Type")
        .is_none_or(|t| t.split(',').any(|f| f.trim().eq_ignore_ascii_case("IPv6")));
    let full_v6 = req
        .header("X-CSTP-Full-IPv6-Capability")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let v6 = match (addrs.v6, p.prefix_v6) {
        (Some(a), Some(len)) if wants_v6 && full_v6 => {
            h.push(("X-CSTP-Address-IP6", format!("{a}/{len}")));
            true
        }
        _ => false,
    };
    for d in &p.dns {
        if d.is_ipv4() || v6 {
            h.push(("X-CSTP-DNS", d.to_string()));
        }
    }
    if let Some(d) = &p.default_domain {
        h.push(("X-CSTP-Default-Domain", d.clone()));
    }
    if p.local_lan_access {
        // Cisco's "local LAN access" flag; it must come first.
        h.push(("X-CSTP-Split-Exclude", "0.0.0.0/255.255.255.255".into()));
    }
    let (include, nets) = match &p.routing {
        Routing::All => (false, &[][..]),
        Routing::Include(n) => (true, &n[..]),
        Routing::Exclude(n) => (false, &n[..]),
    };
    for n in nets {
        match n {
            IpNet::V4(n) => h.push((
                if include {
                    "X-CSTP-Split-Include"
                } else {
                    "X-CSTP-Split-Exclude"
                },
                format!("{}/{}", n.network(), n.netmask()),
            )),
            IpNet::V6(n) if v6 => h.push((
                if include {
                    "X-CSTP-Split-Include-IP6"
                } else {
                    "X-CSTP-Split-Exclude-IP6"
                },
                n.to_string(),
            )),
            IpNet::V6(_) => {}
        }
    }
    h.push((
        "X-CSTP-Tunnel-All-DNS",
        matches!(p.routing, Routing::All).to_string(),
    ));
    if let Some(b) = &p.banner {
        h.push(("X-CSTP-Banner", percent_encode_banner(b)));
    }
    let session_secs = p.session_timeout.as_secs();
    h.push(("X-CSTP-Session-Timeout", session_secs.to_string()));
    h.push((
        "X-CSTP-Session-Timeout-Remaining",
        remaining.as_secs().to_string(),
    ));
    h.push(("X-CSTP-Lease-Duration", session_secs.to_string()));
    h.push((
        "X-CSTP-Idle-Timeout",
        match p.idle_timeout_secs {
            0 => "none".into(),
            n => n.to_string(),
        },
    ));
    h.push((
        "X-CSTP-Disconnected-Timeout",
        p.disconnected_timeout_secs.to_string(),
    ));
    h.push(("X-CSTP-DPD", p.dpd_secs.to_string()));
    h.push(("X-CSTP-Keepalive", p.keepalive_secs.to_string()));
    // rustls cannot renegotiate: ask for a fresh tunnel instead (never).
    h.push(("X-CSTP-Rekey-Method", "none".into()));
    let base = req
        .header("X-CSTP-Base-MTU")
        .and_then(|v| v.parse::<u16>().ok());
    if let Some(base) = base {
        h.push(("X-CSTP-Base-MTU", base.to_string()));
    }
    let mtu = tunnel_mtu(p.mtu, base, dtls.is_some(), peer_v6);
    h.push(("X-CSTP-MTU", mtu.to_string()));
    h.push(("X-CSTP-Keep", "true".into()));
    h.push(("X-CSTP-TCP-Keepalive", "true".into()));
    h.push(("X-CSTP-License", "accept".into()));
    h.push(("X-CSTP-Client-Bypass-Protocol", "false".into()));
    if let Some(answer) = dtls {
        match answer {
            DtlsAnswer::Psk { port, app_id } => {
                h.push(("X-DTLS-Port", port.to_string()));
                h.push(("X-DTLS-App-ID", hex::encode(app_id)));
                h.push(("X-DTLS-CipherSuite", "PSK-NEGOTIATE".into()));
            }
            DtlsAnswer::Resume {
                port,
                sid,
                header,
                name,
            } => {
                h.push(("X-DTLS-Port", port.to_string()));
                h.push(("X-DTLS-Session-ID", hex::encode_upper(sid)));
                h.push((header, name.to_string()));
                h.push(("X-DTLS-MTU", mtu.to_string()));
            }
        }
        h.push(("X-DTLS-DPD", p.dpd_secs.to_string()));
        h.push(("X-DTLS-Keepalive", p.keepalive_secs.to_string()));
        h.push(("X-DTLS-Rekey-Method", "none".into()));
    }
    if let Some(pac) = &p.proxy_pac {
        h.push(("X-CSTP-MSIE-Proxy-PAC-URL", pac.clone()));
    }
    let mut out = String::from("HTTP/1.1 200 CONNECTED\r\n");
    for (n, v) in h {
        out.push_str(n);
        out.push_str(": ");
        out.push_str(&v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out
}

/// Whether the client offers DTLS in PSK-NEGOTIATE mode.
pub fn offers_psk_negotiate(req: &Request) -> bool {
    ["X-DTLS-CipherSuite", "X-DTLS12-CipherSuite"]
        .iter()
        .filter_map(|h| req.header(h))
        .any(|v| v.split(':').any(|c| c.trim() == "PSK-NEGOTIATE"))
}

/// openconnect decodes `%XX` in the banner: escape `%`, control characters
/// and non-ASCII bytes so multi-line and UTF-8 banners survive a header.
pub fn percent_encode_banner(b: &str) -> String {
    let mut out = String::with_capacity(b.len());
    for byte in b.bytes() {
        if byte == b'%' || !(0x20..0x7f).contains(&byte) {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push(byte as char);
        }
    }
    out
}

/// The tunnel MTU for a client: the configured one, and with DTLS no more
/// than fits one datagram on the client's path (its `X-CSTP-Base-MTU`
/// less the outer IP and UDP headers and the record overhead of the GCM
/// suites we use), so full-size packets are never fragmented.
///
/// The client's own `X-CSTP-MTU` is not used (ocserv ignores it too):
/// openconnect sends an estimate with room for any suite, 1390 on a
/// 1500-byte path where our AES-GCM records fit 1434, and takes what the
/// server answers.
pub fn tunnel_mtu(configured: u16, base: Option<u16>, dtls: bool, peer_v6: bool) -> u16 {
    match base {
        Some(base) if dtls => {
            let outer = if peer_v6 { 40 + 8 } else { 20 + 8 };
            configured.min(base.saturating_sub(outer + DTLS_GCM_OVERHEAD).max(576))
        }
        _ => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_encoding() {
        assert_eq!(percent_encode_banner("50% off\nnow"), "50%25 off%0Anow");
        assert_eq!(percent_encode_banner("Grüße"), "Gr%C3%BC%C3%9Fe");
    }

    #[test]
    fn dtls_mtu_fills_the_path_exactly() {
        // 1500 - 20 (IPv4) - 8 (UDP) - 13 (record header) - 8 (nonce)
        // - 16 (tag) - 1 (CSTP type byte).
        assert_eq!(tunnel_mtu(1500, Some(1500), true, false), 1434);
        assert_eq!(tunnel_mtu(1500, Some(1500), true, true), 1414);
        // The configured MTU stays the ceiling; TLS alone has no datagram
        // to fit; a tiny path still gets the minimum.
        assert_eq!(tunnel_mtu(1300, Some(1500), true, false), 1300);
        assert_eq!(tunnel_mtu(1399, Some(1500), false, false), 1399);
        assert_eq!(tunnel_mtu(1399, None, true, false), 1399);
        assert_eq!(tunnel_mtu(1399, Some(300), true, false), 576);
    }

    #[test]
    fn legacy_names_pick_the_strongest_gcm_suite() {
        let offer = "PSK-NEGOTIATE:OC-DTLS1_2-AES256-GCM:OC2-DTLS1_2-CHACHA20-POLY1305:OC-DTLS1_2-AES128-GCM:AES128-SHA";
        assert_eq!(
            pick_legacy_suite(offer),
            Some(("OC-DTLS1_2-AES256-GCM", DTLS12_SUITES[1]))
        );
        assert_eq!(
            pick_legacy_suite("OC-DTLS1_2-AES128-GCM").map(|(_, s)| s.name),
            Some("AES128-GCM-SHA256")
        );
        assert_eq!(pick_legacy_suite("AES128-SHA:AES256-SHA"), None, "DTLS 0.9");
    }

    fn request(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "CONNECT".into(),
            path: "/CSCOSSLC/tunnel".into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: Vec::new(),
        }
    }

    fn params(routing: Routing) -> TunnelParams {
        TunnelParams {
            mtu: 1500,
            netmask_v4: "255.255.255.0".parse().unwrap(),
            prefix_v6: Some(64),
            dns: vec![
                "198.18.2.53".parse().unwrap(),
                "fd00:2::53".parse().unwrap(),
            ],
            default_domain: Some("corp.example".into()),
            banner: Some("Hello\nworld".into()),
            local_lan_access: false,
            routing,
            session_timeout: Duration::from_secs(8 * 3600),
            idle_timeout_secs: 0,
            disconnected_timeout_secs: 300,
            dpd_secs: 30,
            keepalive_secs: 20,
            proxy_pac: Some("http://198.18.5.2/proxy.pac".into()),
        }
    }

    const ADDRS: Addresses = Addresses {
        v4: Ipv4Addr::new(198, 19, 0, 7),
        v6: Some(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7)),
    };

    /// The values of header `name` in a response head.
    fn values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
        head.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .collect()
    }

    const MASTER: &str = "5078F3B5ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB";

    #[test]
    fn psk_negotiate_first_then_cisco_then_openconnects_legacy_names() {
        let oc = request(&[
            ("X-DTLS-Master-Secret", MASTER),
            (
                "X-DTLS-CipherSuite",
                "PSK-NEGOTIATE:OC-DTLS1_2-AES256-GCM:AES128-SHA",
            ),
            (
                "X-DTLS12-CipherSuite",
                "ECDHE-RSA-AES256-GCM-SHA384:AES128-GCM-SHA256",
            ),
        ]);
        assert_eq!(choose_dtls(&oc, true), Ok(DtlsChoice::Psk));
        let Ok(DtlsChoice::Resume { header, name, .. }) = choose_dtls(&oc, false) else {
            panic!("resumption when PSK-NEGOTIATE is off");
        };
        assert_eq!(
            (header, name),
            ("X-DTLS12-CipherSuite", "ECDHE-RSA-AES256-GCM-SHA384")
        );
        let legacy = request(&[
            ("X-DTLS-Master-Secret", MASTER),
            ("X-DTLS-CipherSuite", "OC-DTLS1_2-AES128-GCM"),
        ]);
        let Ok(DtlsChoice::Resume {
            header,
            name,
            suite,
            master,
        }) = choose_dtls(&legacy, true)
        else {
            panic!("legacy name");
        };
        assert_eq!(
            (header, name, suite.name),
            (
                "X-DTLS-CipherSuite",
                "OC-DTLS1_2-AES128-GCM",
                "AES128-GCM-SHA256"
            )
        );
        assert_eq!(master[..2], [0x50, 0x78]);
        let old = request(&[
            ("X-DTLS-Master-Secret", MASTER),
            ("X-DTLS-CipherSuite", "AES128-SHA:AES256-SHA"),
        ]);
        assert_eq!(choose_dtls(&old, true), Err(NoDtls::NoCommonSuite));
        assert_eq!(choose_dtls(&request(&[]), true), Err(NoDtls::NotAsked));
        let bad = request(&[
            ("X-DTLS-Master-Secret", "abcd"),
            ("X-DTLS12-CipherSuite", "AES128-GCM-SHA256"),
        ]);
        assert_eq!(choose_dtls(&bad, true), Err(NoDtls::NotAsked));
    }

    #[test]
    fn the_answer_configures_an_openconnect_client_with_psk_dtls() {
        let req = request(&[
            ("X-CSTP-Address-Type", "IPv6,IPv4"),
            ("X-CSTP-Full-IPv6-Capability", "true"),
            ("X-CSTP-Base-MTU", "1500"),
        ]);
        let nets = vec![
            "198.18.2.0/24".parse().unwrap(),
            "fd00:2::/64".parse().unwrap(),
        ];
        let answer = DtlsAnswer::Psk {
            port: 443,
            app_id: [0xab; 32],
        };
        let head = response_head(
            &params(Routing::Include(nets)),
            &req,
            ADDRS,
            Duration::from_secs(100),
            false,
            Some(&answer),
        );
        assert!(head.starts_with("HTTP/1.1 200 CONNECTED\r\n") && head.ends_with("\r\n\r\n"));
        assert_eq!(values(&head, "X-CSTP-Address"), ["198.19.0.7"]);
        assert_eq!(values(&head, "X-CSTP-Address-IP6"), ["fd00:1::7/64"]);
        assert_eq!(values(&head, "X-CSTP-DNS"), ["198.18.2.53", "fd00:2::53"]);
        assert_eq!(
            values(&head, "X-CSTP-Split-Include"),
            ["198.18.2.0/255.255.255.0"]
        );
        assert_eq!(values(&head, "X-CSTP-Split-Include-IP6"), ["fd00:2::/64"]);
        assert_eq!(values(&head, "X-CSTP-Tunnel-All-DNS"), ["false"]);
        assert_eq!(values(&head, "X-CSTP-Banner"), ["Hello%0Aworld"]);
        assert_eq!(values(&head, "X-CSTP-Idle-Timeout"), ["none"]);
        assert_eq!(
            values(&head, "X-CSTP-MSIE-Proxy-PAC-URL"),
            ["http://198.18.5.2/proxy.pac"]
        );
        assert_eq!(values(&head, "X-CSTP-Session-Timeout-Remaining"), ["100"]);
        // The datagram on a 1500-byte path fills exactly.
        assert_eq!(values(&head, "X-CSTP-MTU"), ["1434"]);
        assert_eq!(
            values(&head, "X-DTLS-App-ID"),
            [hex::encode([0xab; 32]).as_str()]
        );
        assert_eq!(values(&head, "X-DTLS-CipherSuite"), ["PSK-NEGOTIATE"]);
        assert!(
            values(&head, "X-DTLS-MTU").is_empty(),
            "PSK mode sends none"
        );
    }

    #[test]
    fn the_answer_for_cisco_resumption_and_for_a_client_without_ipv6() {
        let req = request(&[("X-CSTP-Address-Type", "IPv4")]);
        let answer = DtlsAnswer::Resume {
            port: 443,
            sid: [0x0f; 32],
            header: "X-DTLS12-CipherSuite",
            name: "AES256-GCM-SHA384",
        };
        let head = response_head(
            &params(Routing::All),
            &req,
            ADDRS,
            Duration::from_secs(5),
            false,
            Some(&answer),
        );
        assert!(values(&head, "X-CSTP-Address-IP6").is_empty());
        assert_eq!(values(&head, "X-CSTP-DNS"), ["198.18.2.53"], "no IPv6 DNS");
        assert_eq!(values(&head, "X-CSTP-Tunnel-All-DNS"), ["true"]);
        assert_eq!(
            values(&head, "X-DTLS-Session-ID"),
            ["0F".repeat(32).as_str()]
        );
        assert_eq!(values(&head, "X-DTLS12-CipherSuite"), ["AES256-GCM-SHA384"]);
        assert_eq!(
            values(&head, "X-DTLS-MTU"),
            ["1500"],
            "no base MTU: the configured one"
        );
        // Without DTLS, no X-DTLS header at all.
        let head = response_head(
            &params(Routing::All),
            &req,
            ADDRS,
            Duration::ZERO,
            false,
            None,
        );
        assert!(!head.contains("X-DTLS"));
    }
}
