//! The gateway's configuration file (TOML).
//!
//! Every option is documented here, where it is defined, and in
//! `examples/gateway.toml`. [`Config::load`] parses and validates; every
//! error names the offending key, the bad value and what would be valid.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use vpn_common::{POLICY_ISOLATE, POLICY_SPLIT_ENFORCE, PolicyInfo};

use crate::policy::{self, GroupPolicyConfig, PolicyDef, Rule, Schedule};

/// A configuration problem, worded for the admin who wrote the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key '{key}': {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub http: crate::proto::http::Limits,
    pub tunnel: TunnelConfig,
    #[serde(default)]
    pub client_routing: ClientRouting,
    #[serde(default)]
    pub session: SessionConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub ban: BanConfig,
    /// RADIUS servers (`[radius]`), used when `auth.method = "radius"`.
    #[serde(default)]
    pub radius: RadiusConfig,
    /// LDAP / Active Directory servers (`[ldap]`), used when `auth.method
    /// = "ldap"`.
    #[serde(default)]
    pub ldap: LdapConfig,
    /// Tunnel groups offered at login (`[[group]]`). With more than one, the
    /// login form has a group selector; with none, one group called
    /// "default" exists.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    #[serde(default)]
    pub policy: PolicySettings,
    #[serde(default)]
    pub dtls: DtlsConfig,
    /// WAN uplinks VPN traffic leaves through (`[[uplink]]`). None = the
    /// daemon leaves routing and NAT of client traffic to the host.
    #[serde(default, rename = "uplink")]
    pub uplinks: Vec<UplinkConfig>,
    #[serde(default)]
    pub failover: FailoverConfig,
    /// Web proxies group policies redirect web traffic to
    /// (`[[web_proxy]]`, `group_policy.web_proxy`).
    #[serde(default, rename = "web_proxy")]
    pub web_proxies: Vec<WebProxyConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Group policies (`[[group_policy]]`, see `policy.rs` for the fields).
    /// `vpnctl reload` applies changes to these and to `[policy]` live.
    #[serde(default, rename = "group_policy")]
    pub group_policies: Vec<GroupPolicyConfig>,
    /// The client profile (`[profile]`, options in `profile.rs`): the
    /// server list, backup servers, trusted network detection and
    /// always-on settings Cisco clients download at login. A reload
    /// applies changes to new logins.
    #[serde(default)]
    pub profile: crate::profile::ProfileOptions,
    #[serde(default)]
    pub identity_feed: IdentityFeedConfig,
}

/// `[identity_feed]`: who holds which VPN address, for web proxies and
/// other consumers (`identity/`): `GET /v1/mappings`, `GET
/// /v1/mappings/<address>` and the stream of numbered changes `GET
/// /v1/changes` (server-sent events, resumable with `Last-Event-ID`),
/// over HTTPS with the gateway's certificate. Keep it on a management
/// address: it tells who is connected from where.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityFeedConfig {
    /// Default false.
    pub enabled: bool,
    /// `address:port`. Default `127.0.0.1:9443`.
    pub listen: SocketAddr,
    /// The shared secret consumers present, as a bearer token
    /// (`Authorization: Bearer SECRET`) or as the password of basic
    /// authentication (any user name). At least 16 characters; required
    /// when enabled.
    pub secret: String,
    /// Changes kept for consumers that reconnect (1 to 1000000): one that
    /// was away for more gets a fresh snapshot instead. Default 10000.
    pub history: usize,
    /// Consumers connected at once (1 to 1024); more are refused with 503.
    /// Default 16.
    pub max_consumers: usize,
}

impl Default for IdentityFeedConfig {
    fn default() -> Self {
        IdentityFeedConfig {
            enabled: false,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9443)),
            secret: String::new(),
            history: 10_000,
            max_consumers: 16,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint (`GET /metrics`, OpenMetrics
/// text). Keep it on a management address: it tells who is connected.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Default true.
    pub enabled: bool,
    /// `IP:port`. Default `127.0.0.1:9810` (loopback only).
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9810)),
        }
    }
}

/// `[dtls]`: the UDP data channel. Clients carry data over DTLS when UDP
/// gets through and fall back to the TLS connection when it does not.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DtlsConfig {
    /// Offer DTLS. Default true.
    pub enabled: bool,
    /// UDP port; default: the TLS listener's port number.
    pub port: Option<u16>,
    /// Use PSK-NEGOTIATE with clients that offer it (openconnect); others
    /// (Cisco) get session resumption. Default true; false forces
    /// resumption for everyone.
    pub psk_negotiate: bool,
    /// Uplink interfaces that get the XDP guard: only well-formed DTLS
    /// reaches the DTLS port, new handshakes are rate-limited per source.
    /// Other traffic on them is untouched. Default none.
    pub xdp_interfaces: Vec<String>,
    /// ClientHellos per second each source address may send. Default 10.
    pub hello_rate: u32,
    /// ClientHellos a source may send in a burst. Default 20.
    pub hello_burst: u32,
    /// Receive coalescing, like a NIC's adaptive rx-usecs: after a batch
    /// of datagrams that carried bulk data (about 8 full-size records or
    /// more) but did not fill the batch, the packet worker waits this many
    /// microseconds so the next batch gathers more. Bulk uploads then reach
    /// the LAN as fewer, larger TCP packets (a third less CPU per GB in
    /// the tunnel benchmark). Interactive traffic from clients arriving
    /// during a bulk upload waits up to this long; traffic to clients does
    /// not (the worker serves its TUN queue meanwhile). 0 turns it off; at
    /// most 1000. Default 200.
    pub rx_coalesce_usecs: u16,
    /// DTLS handshakes in progress at most (each holds an OpenSSL object
    /// and a queue for up to 15 s). More ClientHellos are dropped; the
    /// client retries, or stays on TLS. Default 1024.
    pub max_handshakes: usize,
    /// Of those, from one source (an IPv4 address, an IPv6 /64). Default
    /// 16.
    pub max_handshakes_per_source: u32,
}

impl Default for DtlsConfig {
    fn default() -> Self {
        DtlsConfig {
            enabled: true,
            port: None,
            psk_negotiate: true,
            xdp_interfaces: Vec::new(),
            hello_rate: 10,
            hello_burst: 20,
            rx_coalesce_usecs: 200,
            max_handshakes: 1024,
            max_handshakes_per_source: 16,
        }
    }
}

/// `[[uplink]]`: a WAN uplink. Client traffic to destinations the main
/// routing table has no specific route for leaves through the active uplink
/// (the best healthy one by priority), masqueraded to its address unless
/// the destination is in its `nat_exempt` prefixes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Name in `vpnctl uplinks` and events, e.g. "isp1".
    pub name: String,
    /// Its interface, e.g. "wan1".
    pub interface: String,
    /// The next hop on it (IPv4).
    pub gateway: std::net::Ipv4Addr,
    /// Lower is preferred. Default 100.
    #[serde(default = "default_uplink_priority")]
    pub priority: u32,
    /// The public name (or address, `host` or `host:port`) clients reach
    /// the gateway at through this uplink, e.g. "vpn-isp1.example.com":
    /// the client profile's server list has an entry for it, with the
    /// other uplinks' names as its backups. Default none.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Masquerade VPN traffic leaving here to the interface's address.
    /// Default true.
    #[serde(default = "default_true")]
    pub masquerade: bool,
    /// Destinations (internal, site-to-site) that must see the client's
    /// own VPN address when reached through this uplink. Default none.
    #[serde(default)]
    pub nat_exempt: Vec<IpNet>,
    #[serde(default)]
    pub probe: ProbeConfig,
}

fn default_uplink_priority() -> u32 {
    100
}

fn default_true() -> bool {
    true
}

/// `[uplink.probe]`: the active health check of an uplink (ICMP echo out
/// of its interface). Carrier loss counts at once.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Address to ping through the uplink; default: its gateway.
    pub target: Option<std::net::Ipv4Addr>,
    /// Milliseconds between probes, 100 to 10000. Default 500.
    pub interval_ms: u64,
    /// Consecutive lost probes that make the uplink down, 1 to 20.
    /// Default 3.
    pub failures: u32,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            target: None,
            interval_ms: 500,
            failures: 3,
        }
    }
}

/// `[[web_proxy]]`: a web proxy on a directly connected network, in
/// intercept (transparent) mode. The web traffic of the policies that name
/// it is routed to it unchanged (addresses and ports as the client sent
/// them), and it intercepts it; its answers come back through the gateway
/// to the clients. Its health is a TCP connection to `probe_port`; while
/// it is down each policy's `web_proxy_down` applies.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebProxyConfig {
    /// Name policies use and events show, e.g. "squid".
    pub name: String,
    /// The proxy host's IPv4 address, on a network the gateway is
    /// directly connected to.
    pub address: Ipv4Addr,
    /// The port the health probe connects to (the proxy's). Default 3128.
    #[serde(default = "default_probe_port")]
    pub probe_port: u16,
    /// Milliseconds between probes, 100 to 60000. Default 1000.
    #[serde(default = "default_proxy_interval")]
    pub interval_ms: u64,
    /// Failed probes in a row that make the proxy down, 1 to 20. Default 3.
    /// One success makes it up again.
    #[serde(default = "default_proxy_failures")]
    pub failures: u32,
}

fn default_probe_port() -> u16 {
    3128
}
fn default_proxy_interval() -> u64 {
    1000
}
fn default_proxy_failures() -> u32 {
    3
}

/// `[failover]`: how uplinks take over from each other.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// A preferred uplink that came back must stay healthy this long before
    /// traffic fails back to it. Default 30.
    pub hold_secs: u64,
    /// Routing table of the first uplink; the others follow (one each).
    /// Default 7100.
    pub table_base: u32,
    /// `ip rule` priority of the daemon's first rule; it uses up to
    /// 2 + 2 x uplinks priorities from there. Default 7100.
    pub rule_priority: u32,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            hold_secs: 30,
            table_base: 7100,
            rule_priority: 7100,
        }
    }
}

/// `[policy]`: which group policy applies by default, and limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// Group policy for users without one of their own. None = no policy
    /// (everything allowed).
    pub default: Option<String>,
    /// Map entries one policy may compile to; a policy over it is rejected
    /// at load with a clear error, never installed partially. Default 200000.
    pub max_entries: usize,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            default: None,
            max_entries: 200_000,
        }
    }
}

/// `[server]`: where the daemon listens and keeps its files.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TLS listener, `address:port`. Default `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// Directory for generated state (the self-signed certificate).
    /// Default `/var/lib/vpn-gateway`.
    pub state_dir: PathBuf,
    /// Unix socket `vpnctl` talks to. Default `/run/vpn-gateway/vpnd.sock`.
    pub control_socket: PathBuf,
    /// A system group whose members may use `vpnctl` (the socket is then
    /// mode 0660 and that group's); without it only root may (mode 0600).
    /// Each connection's credentials are checked too. Default none.
    pub control_group: Option<String>,
    /// File that receives one JSON object per event (`events.rs` lists
    /// them: connects, disconnects with the reason, failed and refused
    /// logins, lock-outs, tunnels going down, reloads, uplink changes).
    /// Optional; events also go to the log.
    pub event_log: Option<PathBuf>,
    /// Maximum concurrent sessions. Further logins are refused with a
    /// message; existing sessions are untouched. Default 250.
    pub max_sessions: u32,
    /// bpffs directory where the BPF maps are pinned. Default `/sys/fs/bpf/vpn`.
    pub bpf_pin_dir: PathBuf,
    /// Shown to users as the login form's title. Default `vpn-gateway`.
    pub name: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 443)),
            state_dir: PathBuf::from(crate::paths::STATE_DIR),
            control_socket: PathBuf::from(crate::paths::CONTROL_SOCKET),
            control_group: None,
            event_log: None,
            max_sessions: 250,
            bpf_pin_dir: PathBuf::from(crate::paths::BPF_PIN_DIR),
            name: "vpn-gateway".into(),
        }
    }
}

/// `[tls]`: the server certificate and protocol versions.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the server certificate followed by its chain. When
    /// neither this nor `key_file` is set, a self-signed certificate is
    /// generated once into `server.state_dir` and its `pin-sha256:` logged.
    pub cert_file: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// Host names (DNS SANs) for the generated certificate. Default
    /// `["vpn-gateway"]`; the listener's address is always added.
    pub hostnames: Vec<String>,
    /// Allow TLS 1.3 (default true). Some old Cisco clients misbehave with
    /// TLS 1.3; TLS 1.2 is always offered.
    pub tls13: Option<bool>,
    /// Batch the reads of tunnels whose clients send fast (default true):
    /// with a low-water mark on the socket, a busy tunnel wakes up once per
    /// 16-64 KiB instead of once per few packets, which costs the last
    /// packets of a burst up to 2 ms. Turn off to trade that CPU for the
    /// lowest latency under load.
    pub read_batching: Option<bool>,
    /// PEM bundle of the CAs whose client certificates the gateway takes.
    /// Set, the server asks every client for a certificate (a client
    /// without one still gets the password groups); `[[group]] auth`
    /// says which groups need one. Changing it needs a restart.
    pub client_ca_file: Option<PathBuf>,
    /// PEM file of CRLs from those CAs; a revoked certificate fails the
    /// TLS handshake. Re-read by `vpnctl reload` (a bad file is rejected
    /// and the old list kept).
    pub client_crl_file: Option<PathBuf>,
    /// Where a client certificate's user name comes from: `"cn"` (the
    /// subject's common name, default), `"email"` (the first SAN e-mail,
    /// else the subject's emailAddress) or `"upn"` (the SAN
    /// userPrincipalName of Microsoft PKIs).
    #[serde(default)]
    pub client_username: CertName,
}

/// `tls.client_username`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CertName {
    #[default]
    Cn,
    Email,
    Upn,
}

/// `[tunnel]`: the tunnel device and the addresses handed to clients.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Name of the TUN device the daemon creates. Default `vpn0`.
    #[serde(default = "default_device")]
    pub device: String,
    /// IPv4 pool in CIDR form. The first host address is the gateway's own
    /// address on the tunnel device; clients get the others, one /32 each.
    pub pool_v4: String,
    /// Optional IPv6 prefix (CIDR, /64 to /120). Clients get one address
    /// each, at the same offset as their IPv4 address.
    pub pool_v6: Option<String>,
    /// Tunnel MTU pushed to clients. Default 1399; 576..=9000.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// DNS servers pushed to clients (at most 3 are used by openconnect).
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// DNS suffix (default domain) pushed to clients.
    pub default_domain: Option<String>,
    /// Login banner shown by the client after connecting.
    pub banner: Option<String>,
    /// Use the kernel's offloads where it has them (default true): TSO and
    /// checksum offload on the TUN device (reads of up to 64 KiB that vpnd
    /// cuts into packets), UDP GSO for DTLS sends (Linux 4.18) and UDP GRO
    /// for DTLS receives (Linux 5.0). Whatever the kernel lacks is left
    /// out and named in the start log. `false` turns all three off, as
    /// `ethtool -K` would on a NIC: to rule them out when chasing a data
    /// path problem, at some CPU per packet. Changing it needs a restart.
    #[serde(default = "default_true")]
    pub offloads: bool,
}

fn default_device() -> String {
    "vpn0".into()
}
fn default_mtu() -> u16 {
    1399
}

/// `[client_routing]`: what the client sends through the tunnel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientRouting {
    /// `all` (full tunnel), `exclude` (everything except `subnets`) or
    /// `include` (only `subnets`). Default `all`.
    pub mode: String,
    /// Subnets in CIDR form, IPv4 or IPv6, for `include` and `exclude`.
    pub subnets: Vec<String>,
    /// Let clients reach their local LAN while connected: sends the
    /// `0.0.0.0/32` exclude Cisco clients understand. Default false.
    pub local_lan_access: bool,
}

impl Default for ClientRouting {
    fn default() -> Self {
        ClientRouting {
            mode: "all".into(),
            subnets: Vec::new(),
            local_lan_access: false,
        }
    }
}

/// `[session]`: timers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Maximum session length: `8h`, `1d`, `7d`, or a custom `<N>h` with N
    /// from 1 to 256. Default `8h`.
    pub timeout: String,
    /// Seconds without traffic after which a session ends (0 = never).
    /// Default 1800.
    pub idle_timeout_secs: u64,
    /// Dead-peer-detection interval in seconds, pushed to clients; the
    /// server declares the peer dead after 3 intervals of silence. Default 30.
    pub dpd_secs: u64,
    /// Keepalive interval in seconds pushed to clients. Default 20.
    pub keepalive_secs: u64,
    /// Seconds a session whose tunnel dropped (DPD, network change) stays
    /// resumable with its cookie. Default 300.
    pub disconnected_timeout_secs: u64,
    /// Sessions one user may hold at once. At the limit, a new login
    /// replaces the user's oldest session that has no tunnel; if all have
    /// one, it is refused with a message. 0 = no limit. Default 3 (Cisco
    /// ASA's simultaneous logins; ocserv's max-same-clients is 2).
    pub max_per_user: u32,
    /// Sessions survive a restart of vpnd (`session/persist.rs`): they are
    /// saved to `server.state_dir/sessions.json` (cookies as hashes) at
    /// each change; a stop closes the tunnels without ending the sessions,
    /// and clients reconnect with their cookies to the same addresses,
    /// policy, timers and counters. After a crash the changes of the last
    /// 100 ms are lost. Off, the file is removed at start. Default false.
    pub persist: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            timeout: "8h".into(),
            idle_timeout_secs: 1800,
            dpd_secs: 30,
            keepalive_secs: 20,
            disconnected_timeout_secs: 300,
            max_per_user: 3,
            persist: false,
        }
    }
}

/// `[auth]`: how users log in.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Local user database (managed with `vpnctl user`). Default
    /// `/etc/vpn-gateway/users.toml`.
    pub users_file: PathBuf,
    /// Wrong passwords allowed in one login attempt before the server
    /// answers 401 and closes; earlier failures get the form again with an
    /// error. Default 3.
    pub max_failures: u32,
    /// Seconds a started login may take. Default 240.
    pub timeout_secs: u64,
    /// Who checks passwords: `"local"` (the users file, default),
    /// `"radius"` (the servers of `[radius]`) or `"ldap"` (the directory
    /// of `[ldap]`); the users file is not read for logins with the last
    /// two.
    pub method: AuthMethod,
}

/// `auth.method`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    #[default]
    Local,
    Radius,
    Ldap,
}

/// `[radius]`: the RADIUS servers that check passwords when
/// `auth.method = "radius"` (PAP inside the TLS connection, with
/// Access-Challenge for second factors). An Access-Accept's Filter-Id
/// names the user's group policy (exactly, as a `[[group_policy]]` name);
/// Session-Timeout and Idle-Timeout shorten the session's timers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RadiusConfig {
    /// The servers, tried in order: the next when one does not answer
    /// (`[[radius.server]]`).
    #[serde(rename = "server")]
    pub servers: Vec<RadiusServerConfig>,
    /// Milliseconds to wait for an answer to one try. Default 3000.
    pub timeout_ms: u64,
    /// Tries per server before the next one is asked. Default 2.
    pub tries: u32,
    /// NAS-Identifier sent with every request. Default "vpn-gateway".
    pub nas_identifier: String,
    /// Accounting (RFC 2866): Start when a RADIUS session begins, Stop
    /// when it ends (with its octets and packets, from the BPF counters,
    /// and why), to the servers' `accounting_port`. Default true.
    pub accounting: bool,
    /// Seconds between Interim-Updates of each session; 0 = none. Default
    /// 600 (RFC 2869 advises at least 60).
    pub interim_secs: u64,
    /// `IP:port` to take Disconnect-Requests and CoA-Requests on (RFC
    /// 5176; port 3799 is usual), from the servers' addresses with their
    /// secrets: a Disconnect ends the sessions it names, a CoA with
    /// Filter-Id moves them to that group policy at once. Default: off.
    pub dynamic_authorization: Option<String>,
}

impl Default for RadiusConfig {
    fn default() -> Self {
        RadiusConfig {
            servers: Vec::new(),
            timeout_ms: 3000,
            tries: 2,
            nas_identifier: "vpn-gateway".into(),
            accounting: true,
            interim_secs: 600,
            dynamic_authorization: None,
        }
    }
}

/// `[[radius.server]]`: one RADIUS server.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RadiusServerConfig {
    /// `IP:port` of its authentication service, e.g. "198.18.2.2:1812".
    pub address: String,
    /// The shared secret (the `secret` of this gateway's `client` entry
    /// on the server). Keep the config file mode 0600.
    pub secret: String,
    /// Refuse replies without a Message-Authenticator (the defence
    /// against forged replies, CVE-2024-3596). Default true; FreeRADIUS
    /// before 3.2.5 sends it only when told to (`update reply {
    /// &Message-Authenticator := 0x00 }` in post-auth).
    #[serde(default = "yes")]
    pub require_message_authenticator: bool,
    /// The port of its accounting service on the same address; 0 = send
    /// it no accounting. Default 1813.
    #[serde(default = "accounting_port")]
    pub accounting_port: u16,
}

fn yes() -> bool {
    true
}

fn accounting_port() -> u16 {
    1813
}

/// `[ldap]`: the directory that checks passwords when `auth.method =
/// "ldap"` (OpenLDAP, Active Directory): a simple bind as the user over
/// TLS, then the user's groups mapped to a group policy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LdapConfig {
    /// Server URLs, tried in order (the next when one cannot be reached
    /// or fails): `ldaps://HOST[:636]`, or `ldap://HOST[:389]` with
    /// StartTLS.
    pub servers: Vec<String>,
    /// For `ldap://` URLs: StartTLS before anything is sent. Default true.
    pub starttls: bool,
    /// Allow `ldap://` without StartTLS: passwords in clear on the wire.
    /// Default false; only for a directory on the same host.
    pub allow_plaintext: bool,
    /// The CA certificates (PEM) the servers' certificates must chain
    /// to. Default the system's (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: PathBuf,
    /// Milliseconds a connection, bind or search may take. Default 5000.
    pub timeout_ms: u64,
    /// The user's DN from their name, e.g.
    /// `"uid={user},ou=people,dc=example,dc=org"`; or leave it out and set
    /// `search_base` to search for the user first.
    pub bind_dn: Option<String>,
    /// Where to search for the user (search, then bind as what was found).
    pub search_base: Option<String>,
    /// The user search, `{user}` escaped in. Default `"(uid={user})"`; AD:
    /// `"(sAMAccountName={user})"` or `"(userPrincipalName={user})"`.
    pub user_filter: String,
    /// The account that searches (none = anonymous search).
    pub service_dn: Option<String>,
    pub service_password: Option<String>,
    /// The user's attribute listing their groups' DNs (`"memberOf"`, on
    /// AD and OpenLDAP's memberof overlay), or leave it out and set
    /// `group_base` to search for groups.
    pub group_attribute: Option<String>,
    /// Where to search for the user's groups.
    pub group_base: Option<String>,
    /// The group search, `{dn}` (the user's DN) escaped in. Default
    /// `"(member={dn})"`; AD with nested groups:
    /// `"(member:1.2.840.113556.1.4.1941:={dn})"` (LDAP_MATCHING_RULE_IN_CHAIN).
    pub group_filter: String,
    /// Follow groups in groups with `group_base`: the groups found are
    /// searched for in turn (up to 8 levels, 256 groups), for directories
    /// without AD's in-chain rule (OpenLDAP). Default false.
    pub nested_groups: bool,
    /// Group to policy, in order: the first group the user is in that
    /// has a row gives the policy (`[[ldap.group_map]]`).
    pub group_map: Vec<GroupMapConfig>,
    /// A user in none of the mapped groups: `"default"` (the default
    /// policy, default) or `"refuse"` (no login).
    pub unmapped: Unmapped,
}

impl Default for LdapConfig {
    fn default() -> Self {
        LdapConfig {
            servers: Vec::new(),
            starttls: true,
            allow_plaintext: false,
            ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            timeout_ms: 5000,
            bind_dn: None,
            search_base: None,
            user_filter: "(uid={user})".into(),
            service_dn: None,
            service_password: None,
            group_attribute: None,
            group_base: None,
            group_filter: "(member={dn})".into(),
            nested_groups: false,
            group_map: Vec::new(),
            unmapped: Unmapped::Default,
        }
    }
}

/// `[[ldap.group_map]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupMapConfig {
    /// The group: its DN, or just its name (the value of its first RDN,
    /// e.g. the CN), in any case.
    pub group: String,
    /// The `[[group_policy]]` its members get.
    pub policy: String,
}

/// `ldap.unmapped`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Unmapped {
    #[default]
    Default,
    Refuse,
}

/// `[ldap]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LdapSettings {
    /// `(url, starttls)` in order.
    pub servers: Vec<(String, bool)>,
    pub ca_file: PathBuf,
    pub timeout: Duration,
    pub user: UserLookup,
    pub groups: GroupLookup,
    pub group_map: Vec<GroupMapConfig>,
    pub unmapped: Unmapped,
}

/// How a user's DN is found.
#[derive(Debug, Clone, PartialEq)]
pub enum UserLookup {
    /// `bind_dn` with `{user}`.
    Template(String),
    Search {
        base: String,
        filter: String,
        /// `(dn, password)`; none = anonymous.
        service: Option<(String, String)>,
    },
}

/// How a user's groups are found.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupLookup {
    None,
    Attribute(String),
    Search {
        base: String,
        filter: String,
        /// Follow groups in groups.
        nested: bool,
    },
}

impl LdapConfig {
    fn validate(
        &self,
        used: bool,
        policies: &[PolicyDef],
    ) -> Result<Option<LdapSettings>, ConfigError> {
        if !used {
            return Ok(None);
        }
        if self.servers.is_empty() {
            return Err(invalid(
                "ldap.servers",
                "method \"ldap\" is used (auth.method or a [[group]]) but ldap.servers is empty: list ldaps:// or ldap:// URLs",
            ));
        }
        let servers = self
            .servers
            .iter()
            .map(|u| {
                if u.starts_with("ldaps://") {
                    Ok((u.clone(), false))
                } else if u.starts_with("ldap://") {
                    if !self.starttls && !self.allow_plaintext {
                        return Err(invalid(
                            "ldap.servers",
                            format!("'{u}' without StartTLS sends passwords in clear: use ldaps://, starttls = true, or allow_plaintext = true"),
                        ));
                    }
                    Ok((u.clone(), self.starttls))
                } else {
                    Err(invalid(
                        "ldap.servers",
                        format!("'{u}' is not an ldaps:// or ldap:// URL"),
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let user = match (&self.bind_dn, &self.search_base) {
            (Some(t), None) if t.contains("{user}") => UserLookup::Template(t.clone()),
            (Some(t), None) => {
                return Err(invalid(
                    "ldap.bind_dn",
                    format!("'{t}' has no {{user}} to put the user name in"),
                ));
            }
            (None, Some(base)) => {
                if !self.user_filter.contains("{user}") {
                    return Err(invalid(
                        "ldap.user_filter",
                        format!("'{}' has no {{user}}", self.user_filter),
                    ));
                }
                let service = match (&self.service_dn, &self.service_password) {
                    (Some(dn), Some(pw)) if !pw.is_empty() => Some((dn.clone(), pw.clone())),
                    (None, None) => None,
                    _ => {
                        return Err(invalid(
                            "ldap.service_password",
                            "service_dn needs a non-empty service_password (or leave both out for anonymous search)",
                        ));
                    }
                };
                UserLookup::Search {
                    base: base.clone(),
                    filter: self.user_filter.clone(),
                    service,
                }
            }
            _ => {
                return Err(invalid(
                    "ldap.bind_dn",
                    "set either bind_dn (a DN template) or search_base (search, then bind), not both or neither",
                ));
            }
        };
        let groups = match (&self.group_attribute, &self.group_base) {
            (None, None) => GroupLookup::None,
            (Some(a), None) => GroupLookup::Attribute(a.clone()),
            (None, Some(base)) => {
                if !self.group_filter.contains("{dn}") {
                    return Err(invalid(
                        "ldap.group_filter",
                        format!("'{}' has no {{dn}}", self.group_filter),
                    ));
                }
                GroupLookup::Search {
                    base: base.clone(),
                    filter: self.group_filter.clone(),
                    nested: self.nested_groups,
                }
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "ldap.group_attribute",
                    "set group_attribute or group_base, not both",
                ));
            }
        };
        if groups == GroupLookup::None && !self.group_map.is_empty() {
            return Err(invalid(
                "ldap.group_map",
                "group_map needs group_attribute or group_base to find the user's groups",
            ));
        }
        if let Some(m) = self
            .group_map
            .iter()
            .find(|m| !policies.iter().any(|p| p.name == m.policy))
        {
            return Err(invalid(
                "ldap.group_map",
                format!(
                    "group '{}' maps to policy '{}', which no [[group_policy]] defines",
                    m.group, m.policy
                ),
            ));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(invalid(
                "ldap.timeout_ms",
                format!("{} is out of range: use 100 to 60000", self.timeout_ms),
            ));
        }
        Ok(Some(LdapSettings {
            servers,
            ca_file: self.ca_file.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            user,
            groups,
            group_map: self.group_map.clone(),
            unmapped: self.unmapped,
        }))
    }
}

/// `[radius]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RadiusSettings {
    pub servers: Vec<RadiusServer>,
    /// One try's wait.
    pub timeout: Duration,
    pub tries: u32,
    pub nas_identifier: String,
    /// Interim-Update period, when accounting is on and periodic.
    pub interim: Option<Duration>,
    pub accounting: bool,
    /// Where Disconnect- and CoA-Requests are taken, if anywhere.
    pub dynamic_authorization: Option<SocketAddr>,
}

/// One `[[radius.server]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RadiusServer {
    pub address: SocketAddr,
    pub secret: String,
    pub require_message_authenticator: bool,
    /// Its accounting service, if it takes accounting.
    pub accounting: Option<SocketAddr>,
}

impl RadiusConfig {
    fn validate(&self, used: bool) -> Result<Option<RadiusSettings>, ConfigError> {
        if !used {
            return Ok(None);
        }
        if self.servers.is_empty() {
            return Err(invalid(
                "radius.server",
                "method \"radius\" is used (auth.method or a [[group]]) but no [[radius.server]] is configured: add one with address and secret",
            ));
        }
        let servers = self
            .servers
            .iter()
            .map(|s| {
                let address: SocketAddr = s.address.parse().map_err(|_| {
                    invalid(
                        "radius.server.address",
                        format!(
                            "'{}' is not IP:port (for example \"198.18.2.2:1812\")",
                            s.address
                        ),
                    )
                })?;
                if s.secret.is_empty() {
                    return Err(invalid(
                        "radius.server.secret",
                        format!("the secret for {address} is empty"),
                    ));
                }
                Ok(RadiusServer {
                    address,
                    secret: s.secret.clone(),
                    require_message_authenticator: s.require_message_authenticator,
                    accounting: (s.accounting_port != 0)
                        .then(|| SocketAddr::new(address.ip(), s.accounting_port)),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(invalid(
                "radius.timeout_ms",
                format!("{} is out of range: use 100 to 60000", self.timeout_ms),
            ));
        }
        if !(1..=10).contains(&self.tries) {
            return Err(invalid(
                "radius.tries",
                format!("{} is out of range: use 1 to 10", self.tries),
            ));
        }
        if self.nas_identifier.is_empty() || self.nas_identifier.len() > 253 {
            return Err(invalid("radius.nas_identifier", "use 1 to 253 characters"));
        }
        let dynamic_authorization = self
            .dynamic_authorization
            .as_deref()
            .map(|a| {
                a.parse().map_err(|_| {
                    invalid(
                        "radius.dynamic_authorization",
                        format!("'{a}' is not IP:port (for example \"198.18.2.1:3799\")"),
                    )
                })
            })
            .transpose()?;
        Ok(Some(RadiusSettings {
            dynamic_authorization,
            servers,
            timeout: Duration::from_millis(self.timeout_ms),
            tries: self.tries,
            nas_identifier: self.nas_identifier.clone(),
            interim: (self.accounting && self.interim_secs > 0)
                .then(|| Duration::from_secs(self.interim_secs)),
            accounting: self.accounting,
        }))
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users_file: PathBuf::from(crate::paths::USERS_FILE),
            max_failures: 3,
            timeout_secs: 240,
            method: AuthMethod::Local,
        }
    }
}

/// `[limits]`: what someone without credentials may make the gateway hold
/// or do (`auth/admission.rs`). Each is a bound an attacker hits long before
/// the machine does, and that legitimate clients, who log in once and
/// then hold one tunnel, never notice.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections that are not (yet) tunnels, in total: the login phase.
    /// More are closed at once. Tunnels do not count (sessions bound
    /// them). Default 1024.
    pub max_connections: usize,
    /// Of those, from one source (an IPv4 address, an IPv6 /64). Default
    /// 16; raise it for many users behind one NAT address.
    pub max_connections_per_source: u32,
    /// Requests one connection may make before it becomes a tunnel; then
    /// it is closed (the client reconnects if it has more to say). Default
    /// 100.
    pub max_requests_per_connection: u32,
    /// Seconds a connection may stay without becoming a tunnel. Default
    /// 300.
    pub max_connection_secs: u64,
    /// Logins in progress (between the first form and success), in total.
    /// Default 4096.
    pub max_pending_logins: usize,
    /// Of those, started from one source. Default 16.
    pub max_pending_logins_per_source: u32,
    /// The window failed logins are counted in, in seconds; a lockout
    /// lasts until its window ends. Default 900.
    pub lockout_window_secs: u64,
    /// Failed logins (wrong passwords and unknown users) from one source
    /// in a window, after which it may not try again until the window
    /// ends. 0 = no limit. Default 10.
    pub lockout_source_failures: u32,
    /// Failed logins for one user name in a window, from all sources,
    /// after which that user may only log in from an address they logged
    /// in from successfully in the last `familiar_days` (so a stranger's
    /// guesses cannot lock them out of their own devices). 0 = no limit.
    /// Default 20.
    pub lockout_user_failures: u32,
    /// How long a successful login's address stays familiar for its user,
    /// in days (remembered in memory only). Default 30.
    pub familiar_days: u64,
    /// Password checks (argon2: about 19 MiB and a core for tens of
    /// milliseconds each) that run at once. 0 = one per core. Default 0.
    pub max_concurrent_verifications: usize,
    /// Password checks that may wait for one of those; more get 503 at
    /// once. Default 64.
    pub max_queued_verifications: usize,
    /// The daemon's resident memory, in MiB, above which new logins are
    /// refused (told "out of memory; try again later") while sessions up
    /// keep going, so a surge of logins (19 MiB of argon2 each) cannot
    /// push a loaded gateway into the kernel's OOM killer. Set it below
    /// the service's MemoryMax. 0 = no ceiling. Applied by a reload.
    /// Default 0.
    pub max_memory_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_source: 16,
            max_requests_per_connection: 100,
            max_connection_secs: 300,
            max_pending_logins: 4096,
            max_pending_logins_per_source: 16,
            lockout_window_secs: 900,
            lockout_source_failures: 10,
            lockout_user_failures: 20,
            familiar_days: 30,
            max_concurrent_verifications: 0,
            max_queued_verifications: 64,
            max_memory_mib: 0,
        }
    }
}

/// `[ban]`: ban points (`auth/bans.rs`). Offences from a source score
/// points; at `max_score` the source may open no new connections for
/// `ban_secs`: the XDP guard drops its TCP SYNs to the TLS port and its
/// DTLS ClientHellos (on `dtls.xdp_interfaces`), and the listener closes
/// what reaches it. Its tunnels already up stay up. Only sources proven by
/// a TCP handshake score (UDP sources can be forged). `vpnctl ban
/// list|add|remove` shows and changes bans. Applied by a reload.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BanConfig {
    /// The score that bans a source (an IPv4 address, an IPv6 /64). 0 =
    /// ban points off. Default 100.
    pub max_score: u32,
    /// Seconds without a new offence after which a source's score is
    /// forgotten. Default 1200.
    pub reset_secs: u64,
    /// Seconds a ban by points lasts. Default 900.
    pub ban_secs: u64,
    /// Points for a wrong password or an unknown user. Default 5: after
    /// `limits.lockout_source_failures` (10) the source is locked out,
    /// and ten more tries while locked out ban it.
    pub wrong_password_points: u32,
    /// Points for a login attempt while locked out. Default 5.
    pub locked_out_points: u32,
    /// Points for an HTTP request that cannot be read (not a slow one).
    /// Default 20: openconnect never sends one.
    pub malformed_request_points: u32,
    /// Points for a TLS handshake that fails or times out (scanners,
    /// clients that do not trust the certificate). Default 2.
    pub failed_handshake_points: u32,
    /// Points for a CONNECT with a cookie of no session (clients of a
    /// session that ended try once). Default 2.
    pub unknown_cookie_points: u32,
    /// Points for a CSTP frame that does not parse on a TLS tunnel (the
    /// tunnel ends; openconnect never sends one). DTLS records do not
    /// score: their source can be forged. Default 20.
    pub bad_record_points: u32,
    /// Prefixes that never score, e.g. an office's NAT address or the
    /// monitoring system. Default none.
    pub exempt: Vec<IpNet>,
}

impl Default for BanConfig {
    fn default() -> Self {
        BanConfig {
            max_score: 100,
            reset_secs: 1200,
            ban_secs: 900,
            wrong_password_points: 5,
            locked_out_points: 5,
            malformed_request_points: 20,
            failed_handshake_points: 2,
            unknown_cookie_points: 2,
            bad_record_points: 20,
            exempt: Vec::new(),
        }
    }
}

/// `[[group]]`: a tunnel group offered at login.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Identifier sent by the client (also the group URL path `/NAME`).
    pub name: String,
    /// Label shown in the group selector. Default: the name.
    pub label: Option<String>,
    /// How its users log in: `"password"` (default), `"certificate"` (a
    /// client certificate from `tls.client_ca_file` alone: no form) or
    /// `"certificate+password"` (both must pass).
    #[serde(default)]
    pub auth: GroupAuth,
    /// With `"certificate+password"`: the certificate's name must be the
    /// user name typed. Default true.
    #[serde(default = "yes")]
    pub cert_name_must_match: bool,
    /// Who checks this group's passwords, over `auth.method`: `"local"`,
    /// `"radius"` or `"ldap"` (e.g. RADIUS with OTP for contractors, the
    /// directory for staff).
    #[serde(default)]
    pub method: Option<AuthMethod>,
    /// A second check after the password passed: the user is asked for a
    /// one-time code, which this method checks as the password (typically
    /// `"radius"` in front of an OTP server, after `"ldap"`).
    #[serde(default)]
    pub second_factor: Option<AuthMethod>,
    /// `[group.profile]`: this group's client profile options over
    /// `[profile]`'s (e.g. always-on for the managed laptops' group).
    #[serde(default)]
    pub profile: Option<crate::profile::ProfileOptions>,
}

impl GroupConfig {
    /// A password group called `name`.
    pub fn named(name: &str) -> Self {
        GroupConfig {
            name: name.into(),
            label: None,
            auth: GroupAuth::Password,
            cert_name_must_match: true,
            method: None,
            second_factor: None,
            profile: None,
        }
    }
}

/// `group.auth`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum GroupAuth {
    #[default]
    #[serde(rename = "password")]
    Password,
    #[serde(rename = "certificate")]
    Certificate,
    #[serde(rename = "certificate+password")]
    CertificateAndPassword,
}

impl GroupAuth {
    pub fn needs_certificate(self) -> bool {
        self != GroupAuth::Password
    }
}

pub use crate::proto::connect::{Routing, TunnelParams};

/// The configuration after validation: what the daemon actually uses.
/// Every value is final here (defaults applied, names resolved, times as
/// durations); nothing else reads the file's raw form.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file as read: only to tell which sections a reload changed
    /// ([`Settings::needs_restart`]).
    raw: Config,
    /// `[server]`.
    pub server: ServerConfig,
    /// `server.control_group`'s gid.
    pub control_gid: Option<u32>,
    pub tls: TlsSettings,
    /// `[http]`.
    pub http: crate::proto::http::Limits,
    /// The tunnel device (`tunnel.device`, `tunnel.mtu`).
    pub device: DeviceSettings,
    pub pool_v4: Ipv4Net,
    pub pool_v6: Option<Ipv6Net>,
    /// What every client is told at CONNECT (routing, DNS, timers, MTU).
    pub tunnel: TunnelParams,
    pub session: SessionSettings,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[limits]`.
    pub limits: Limits,
    /// `[ban]`.
    pub ban: BanConfig,
    /// `[radius]`, when `auth.method = "radius"`.
    pub radius: Option<RadiusSettings>,
    /// `[ldap]`, when `auth.method = "ldap"`.
    pub ldap: Option<LdapSettings>,
    pub groups: Vec<GroupConfig>,
    pub policies: Vec<PolicyDef>,
    /// `policy.default`.
    pub default_policy: Option<String>,
    /// `policy.max_entries`.
    pub max_policy_entries: usize,
    /// Destinations an enforcing policy's clients may reach: the included
    /// subnets, the pushed DNS servers and the gateway's tunnel addresses.
    pub split_allow: Vec<IpNet>,
    /// `[dtls]`, when enabled.
    pub dtls: Option<DtlsSettings>,
    /// `[[uplink]]`.
    pub uplinks: Vec<UplinkConfig>,
    /// `[failover]`.
    pub failover: FailoverConfig,
    /// `[[web_proxy]]`.
    pub web_proxies: Vec<WebProxyConfig>,
    /// `[metrics]` listen address, when enabled.
    pub metrics: Option<SocketAddr>,
    /// The client profile of each group (`[profile]`, `[group.profile]`).
    pub profiles: Arc<crate::profile::Profiles>,
    /// `[identity_feed]`, when enabled.
    pub identity_feed: Option<IdentityFeedConfig>,
    /// `identity_feed.history` (the journal keeps it while the feed is
    /// off too).
    pub identity_history: usize,
}

/// `[tls]`, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub hostnames: Vec<String>,
    pub tls13: bool,
    pub read_batching: bool,
    pub client_ca_file: Option<PathBuf>,
    pub client_crl_file: Option<PathBuf>,
    pub client_username: CertName,
}

/// The tunnel device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSettings {
    pub name: String,
    pub mtu: u16,
    /// `tunnel.offloads`.
    pub offloads: bool,
}

/// `[session]` and `server.max_sessions`, as the session manager and the
/// tunnels use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionSettings {
    pub max_sessions: usize,
    /// 0 = no limit.
    pub max_per_user: usize,
    /// Zero = never.
    pub idle: Duration,
    pub disconnected: Duration,
    /// The dead-peer interval, TLS and DTLS.
    pub dpd: Duration,
    /// `session.persist`.
    pub persist: bool,
}

/// `[dtls]` of an enabled DTLS server, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct DtlsSettings {
    /// `server.listen` with `dtls.port`.
    pub listen: SocketAddr,
    pub psk_negotiate: bool,
    pub xdp_interfaces: Vec<String>,
    pub hello_rate: u32,
    pub hello_burst: u32,
    pub coalesce: Duration,
    pub max_handshakes: usize,
    pub max_handshakes_per_source: u32,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = crate::files::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        let raw: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        raw.validate()
    }

    /// Checks the uplinks and failover settings.
    fn validate_uplinks(&self) -> Result<(), ConfigError> {
        let max = vpn_common::MAX_UPLINKS as usize;
        if self.uplinks.len() > max {
            return Err(invalid(
                "uplink",
                format!("{} uplinks configured: at most {max}", self.uplinks.len()),
            ));
        }
        for (i, u) in self.uplinks.iter().enumerate() {
            let before = &self.uplinks[..i];
            if u.name.is_empty() || before.iter().any(|o| o.name == u.name) {
                return Err(invalid(
                    "uplink.name",
                    format!(
                        "'{}' is empty or used twice: every uplink needs its own name",
                        u.name
                    ),
                ));
            }
            if u.interface.is_empty()
                || u.interface.len() >= 16
                || before.iter().any(|o| o.interface == u.interface)
            {
                return Err(invalid(
                    "uplink.interface",
                    format!(
                        "uplink '{}': interface '{}' is empty, longer than 15 bytes or used twice",
                        u.name, u.interface
                    ),
                ));
            }
            if !(100..=10_000).contains(&u.probe.interval_ms)
                || !(1..=20).contains(&u.probe.failures)
            {
                return Err(invalid(
                    "uplink.probe",
                    format!(
                        "uplink '{}': interval_ms {} / failures {} out of range: use 100 to 10000 ms and 1 to 20 failures",
                        u.name, u.probe.interval_ms, u.probe.failures
                    ),
                ));
            }
        }
        let n = self.uplinks.len() as u32;
        let f = &self.failover;
        let tables = f.table_base..f.table_base.saturating_add(n);
        if f.table_base == 0
            || (253..=255).any(|t| tables.contains(&t))
            || f.table_base > u32::MAX - 64
        {
            return Err(invalid(
                "failover.table_base",
                format!(
                    "{}: the uplinks' tables {}..{} must avoid 0 and the kernel's tables 253-255",
                    f.table_base, tables.start, tables.end
                ),
            ));
        }
        if f.rule_priority == 0 || f.rule_priority > 32_000 {
            return Err(invalid(
                "failover.rule_priority",
                format!(
                    "{}: use 1 to 32000 (below the main table's 32766)",
                    f.rule_priority
                ),
            ));
        }
        Ok(())
    }

    /// Checks every value and derives [`Settings`]; an error names the key,
    /// the bad value and what would be valid.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let pool_v4: Ipv4Net = self.tunnel.pool_v4.parse().map_err(|_| {
            invalid(
                "tunnel.pool_v4",
                format!(
                    "'{}' is not an IPv4 subnet in CIDR form (for example 198.19.0.0/24)",
                    self.tunnel.pool_v4
                ),
            )
        })?;
        if pool_v4.prefix_len() > 30 {
            return Err(invalid(
                "tunnel.pool_v4",
                format!("'{pool_v4}' is too small: use a prefix of /30 or shorter"),
            ));
        }
        let pool_v4 = pool_v4.trunc();
        let pool_v6 = match &self.tunnel.pool_v6 {
            None => None,
            Some(s) => {
                let net: Ipv6Net = s.parse().map_err(|_| {
                    invalid(
                        "tunnel.pool_v6",
                        format!(
                            "'{s}' is not an IPv6 prefix in CIDR form (for example fd00:1::/64)"
                        ),
                    )
                })?;
                if !(64..=120).contains(&net.prefix_len()) {
                    return Err(invalid(
                        "tunnel.pool_v6",
                        format!(
                            "prefix length /{} is not supported: use /64 to /120",
                            net.prefix_len()
                        ),
                    ));
                }
                Some(net.trunc())
            }
        };
        if !(576..=9000).contains(&self.tunnel.mtu) {
            return Err(invalid(
                "tunnel.mtu",
                format!("{} is out of range: use 576 to 9000", self.tunnel.mtu),
            ));
        }
        if pool_v6.is_some() && self.tunnel.mtu < 1280 {
            return Err(invalid(
                "tunnel.mtu",
                format!(
                    "{} is below 1280, the minimum for IPv6 (tunnel.pool_v6 is set)",
                    self.tunnel.mtu
                ),
            ));
        }
        if self.tunnel.device.is_empty()
            || self.tunnel.device.len() > 15
            || !self
                .tunnel
                .device
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "tunnel.device",
                format!(
                    "'{}' is not a valid interface name: 1 to 15 letters, digits, '-' or '_'",
                    self.tunnel.device
                ),
            ));
        }
        let routing = self.client_routing.parse()?;
        let session_timeout = parse_session_timeout(&self.session.timeout)?;
        if self.server.max_sessions == 0 || self.server.max_sessions > vpn_common::MAX_SESSIONS {
            return Err(invalid(
                "server.max_sessions",
                format!(
                    "{} is out of range: use 1 to {}",
                    self.server.max_sessions,
                    vpn_common::MAX_SESSIONS
                ),
            ));
        }
        let hosts = pool_v4.hosts().count().saturating_sub(1);
        if (self.server.max_sessions as usize) > hosts {
            return Err(invalid(
                "server.max_sessions",
                format!(
                    "{} exceeds the {hosts} client addresses in tunnel.pool_v4 {pool_v4}: enlarge the pool or lower max_sessions",
                    self.server.max_sessions
                ),
            ));
        }
        if self.dtls.hello_rate == 0 || self.dtls.hello_rate > 100_000 || self.dtls.hello_burst == 0
        {
            return Err(invalid(
                "dtls.hello_rate",
                format!(
                    "hello_rate {} / hello_burst {} are out of range: use 1 to 100000 per second and a burst of 1 or more",
                    self.dtls.hello_rate, self.dtls.hello_burst
                ),
            ));
        }
        if self.dtls.rx_coalesce_usecs > 1000 {
            return Err(invalid(
                "dtls.rx_coalesce_usecs",
                format!(
                    "{} is out of range: use 0 (off) to 1000 microseconds",
                    self.dtls.rx_coalesce_usecs
                ),
            ));
        }
        if self.dtls.max_handshakes == 0 || self.dtls.max_handshakes_per_source == 0 {
            return Err(invalid(
                "dtls.max_handshakes",
                format!(
                    "max_handshakes {} / max_handshakes_per_source {}: use 1 or more",
                    self.dtls.max_handshakes, self.dtls.max_handshakes_per_source
                ),
            ));
        }
        self.validate_uplinks()?;
        self.validate_web_proxies()?;
        if self.session.dpd_secs == 0 {
            return Err(invalid(
                "session.dpd_secs",
                "0 is not allowed: use 1 or more seconds",
            ));
        }
        if self.session.keepalive_secs == 0 {
            return Err(invalid(
                "session.keepalive_secs",
                "0 is not allowed: use 1 or more seconds",
            ));
        }
        if self.auth.max_failures == 0 {
            return Err(invalid(
                "auth.max_failures",
                "0 is not allowed: use 1 or more",
            ));
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_connections_per_source",
                l.max_connections_per_source.into(),
            ),
            (
                "limits.max_requests_per_connection",
                l.max_requests_per_connection.into(),
            ),
            ("limits.max_connection_secs", l.max_connection_secs),
            ("limits.max_pending_logins", l.max_pending_logins as u64),
            (
                "limits.max_pending_logins_per_source",
                l.max_pending_logins_per_source.into(),
            ),
            ("limits.lockout_window_secs", l.lockout_window_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, "0 is not allowed: use 1 or more"));
            }
        }
        if self.ban.max_score > 0 {
            for (key, value) in [
                ("ban.reset_secs", self.ban.reset_secs),
                ("ban.ban_secs", self.ban.ban_secs),
            ] {
                if value == 0 {
                    return Err(invalid(
                        key,
                        "0 is not allowed: use 1 or more seconds (ban.max_score = 0 turns ban points off)",
                    ));
                }
            }
        }
        if l.max_connection_secs < self.http.request_timeout_secs {
            return Err(invalid(
                "limits.max_connection_secs",
                format!(
                    "{} is shorter than http.request_timeout_secs ({}): a connection could not finish one request",
                    l.max_connection_secs, self.http.request_timeout_secs
                ),
            ));
        }
        if self.http.max_header_bytes < 1024 {
            return Err(invalid(
                "http.max_header_bytes",
                format!(
                    "{} is too small: use 1024 or more",
                    self.http.max_header_bytes
                ),
            ));
        }
        if self.http.request_timeout_secs == 0 {
            return Err(invalid(
                "http.request_timeout_secs",
                "0 is not allowed: use 1 or more seconds",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "tls.cert_file",
                "set both tls.cert_file and tls.key_file, or neither (to use a generated self-signed certificate)",
            ));
        }
        let mut groups = self.groups.clone();
        if groups.is_empty() {
            groups.push(GroupConfig::named("default"));
        }
        if let Some(g) = groups
            .iter()
            .find(|g| g.auth.needs_certificate() && self.tls.client_ca_file.is_none())
        {
            return Err(invalid(
                "group.auth",
                format!(
                    "group '{}' needs client certificates: set tls.client_ca_file to the CA bundle that issues them",
                    g.name
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for g in &groups {
            if g.name.is_empty()
                || !g
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(invalid(
                    "group.name",
                    format!(
                        "'{}' is not a valid group name: use letters, digits, '-', '_' or '.'",
                        g.name
                    ),
                ));
            }
            if !seen.insert(g.name.clone()) {
                return Err(invalid(
                    "group.name",
                    format!("'{}' is defined twice", g.name),
                ));
            }
        }
        let mut split_allow: Vec<IpNet> = match &routing {
            Routing::Include(nets) => nets.clone(),
            _ => Vec::new(),
        };
        split_allow.extend(self.tunnel.dns.iter().map(|a| IpNet::from(*a)));
        let gw4 = pool_v4.hosts().next().expect("validated pool has hosts");
        split_allow.push(IpNet::from(IpAddr::V4(gw4)));
        if let Some(n) = pool_v6 {
            split_allow.push(IpNet::from(IpAddr::V6(Ipv6Addr::from(
                u128::from(n.network()) + 1,
            ))));
        }
        let policies = self.validate_policies(&routing, &split_allow)?;
        let profiles = self.profiles(&groups)?;
        let f = &self.identity_feed;
        if !(1..=1_000_000).contains(&f.history) {
            return Err(invalid(
                "identity_feed.history",
                format!("{} is out of range: use 1 to 1000000 changes", f.history),
            ));
        }
        if !(1..=1024).contains(&f.max_consumers) {
            return Err(invalid(
                "identity_feed.max_consumers",
                format!("{} is out of range: use 1 to 1024", f.max_consumers),
            ));
        }
        if f.enabled && f.secret.chars().count() < 16 {
            return Err(invalid(
                "identity_feed.secret",
                format!(
                    "a secret of {} characters is too short: use at least 16 (e.g. `openssl rand -hex 16`)",
                    f.secret.chars().count()
                ),
            ));
        }
        let control_gid = match &self.server.control_group {
            None => None,
            Some(g) => Some(crate::unix_users::gid_of(g).ok_or_else(|| {
                invalid(
                    "server.control_group",
                    format!("there is no group '{g}' on this system (see `getent group`)"),
                )
            })?),
        };
        let tunnel = TunnelParams {
            mtu: self.tunnel.mtu,
            netmask_v4: pool_v4.netmask(),
            prefix_v6: pool_v6.map(|n| n.prefix_len()),
            dns: self.tunnel.dns.clone(),
            default_domain: self.tunnel.default_domain.clone(),
            banner: self.tunnel.banner.clone(),
            local_lan_access: self.client_routing.local_lan_access,
            routing,
            session_timeout,
            idle_timeout_secs: self.session.idle_timeout_secs,
            disconnected_timeout_secs: self.session.disconnected_timeout_secs,
            dpd_secs: self.session.dpd_secs,
            keepalive_secs: self.session.keepalive_secs,
            proxy_pac: None,
        };
        let dtls = self.dtls.enabled.then(|| {
            let mut listen = self.server.listen;
            listen.set_port(self.dtls.port.unwrap_or(listen.port()));
            DtlsSettings {
                listen,
                psk_negotiate: self.dtls.psk_negotiate,
                xdp_interfaces: self.dtls.xdp_interfaces.clone(),
                hello_rate: self.dtls.hello_rate,
                hello_burst: self.dtls.hello_burst,
                coalesce: Duration::from_micros(self.dtls.rx_coalesce_usecs.into()),
                max_handshakes: self.dtls.max_handshakes,
                max_handshakes_per_source: self.dtls.max_handshakes_per_source,
            }
        });
        // Whether the default method or a password group's own uses `m`.
        let uses = |m: AuthMethod| {
            self.auth.method == m
                || groups.iter().any(|g| {
                    g.auth != GroupAuth::Certificate
                        && (g.method == Some(m) || g.second_factor == Some(m))
                })
        };
        Ok(Settings {
            server: self.server.clone(),
            control_gid,
            tls: TlsSettings {
                cert_file: self.tls.cert_file.clone(),
                key_file: self.tls.key_file.clone(),
                hostnames: self.tls.hostnames.clone(),
                tls13: self.tls.tls13.unwrap_or(true),
                read_batching: self.tls.read_batching.unwrap_or(true),
                client_ca_file: self.tls.client_ca_file.clone(),
                client_crl_file: self.tls.client_crl_file.clone(),
                client_username: self.tls.client_username,
            },
            http: self.http.clone(),
            device: DeviceSettings {
                name: self.tunnel.device.clone(),
                mtu: self.tunnel.mtu,
                offloads: self.tunnel.offloads,
            },
            pool_v4,
            pool_v6,
            tunnel,
            session: SessionSettings {
                max_sessions: self.server.max_sessions as usize,
                max_per_user: self.session.max_per_user as usize,
                idle: Duration::from_secs(self.session.idle_timeout_secs),
                disconnected: Duration::from_secs(self.session.disconnected_timeout_secs),
                dpd: Duration::from_secs(self.session.dpd_secs),
                persist: self.session.persist,
            },
            auth: self.auth.clone(),
            limits: self.limits.clone(),
            ban: self.ban.clone(),
            radius: self.radius.validate(uses(AuthMethod::Radius))?,
            ldap: self.ldap.validate(uses(AuthMethod::Ldap), &policies)?,
            groups,
            policies,
            default_policy: self.policy.default.clone(),
            max_policy_entries: self.policy.max_entries,
            split_allow,
            dtls,
            uplinks: self.uplinks.clone(),
            failover: self.failover.clone(),
            web_proxies: self.web_proxies.clone(),
            metrics: self.metrics.enabled.then_some(self.metrics.listen),
            profiles: Arc::new(profiles),
            identity_feed: self
                .identity_feed
                .enabled
                .then(|| self.identity_feed.clone()),
            identity_history: self.identity_feed.history,
            raw: self,
        })
    }
}

impl Config {
    /// Checks `[[web_proxy]]`.
    fn validate_web_proxies(&self) -> Result<(), ConfigError> {
        let max = vpn_common::MAX_WEB_PROXIES as usize;
        if self.web_proxies.len() > max {
            return Err(invalid(
                "web_proxy",
                format!(
                    "{} web proxies configured: at most {max}",
                    self.web_proxies.len()
                ),
            ));
        }
        for (i, w) in self.web_proxies.iter().enumerate() {
            if w.name.is_empty() || self.web_proxies[..i].iter().any(|o| o.name == w.name) {
                return Err(invalid(
                    "web_proxy.name",
                    format!(
                        "'{}' is empty or used twice: every web proxy needs its own name",
                        w.name
                    ),
                ));
            }
            if w.address.is_unspecified() || w.address.is_loopback() || w.address.is_multicast() {
                return Err(invalid(
                    "web_proxy.address",
                    format!(
                        "web proxy '{}': {} is not a host address: use the proxy's address on a network the gateway is connected to",
                        w.name, w.address
                    ),
                ));
            }
            if w.probe_port == 0
                || !(100..=60_000).contains(&w.interval_ms)
                || !(1..=20).contains(&w.failures)
            {
                return Err(invalid(
                    "web_proxy.probe_port",
                    format!(
                        "web proxy '{}': probe_port {} / interval_ms {} / failures {}: use a port of 1 or more, 100 to 60000 ms and 1 to 20 failures",
                        w.name, w.probe_port, w.interval_ms, w.failures
                    ),
                ));
            }
        }
        let rules = vpn_common::MAX_WEB_PROXIES;
        let first = self
            .failover
            .table_base
            .saturating_add(vpn_common::MAX_UPLINKS);
        let tables = first..first.saturating_add(rules);
        if !self.web_proxies.is_empty() && (253..=255).any(|t| tables.contains(&t)) {
            return Err(invalid(
                "failover.table_base",
                format!(
                    "{}: the web proxies' tables {}..{} must avoid the kernel's tables 253-255",
                    self.failover.table_base, tables.start, tables.end
                ),
            ));
        }
        if !self.web_proxies.is_empty() && self.failover.rule_priority <= rules {
            return Err(invalid(
                "failover.rule_priority",
                format!(
                    "{}: web proxies take the {rules} `ip rule` priorities below it: use {} or more",
                    self.failover.rule_priority,
                    rules + 1
                ),
            ));
        }
        Ok(())
    }

    /// A policy's web proxy (1-based, 0 = none) and ports.
    fn policy_web_proxy(
        &self,
        p: &GroupPolicyConfig,
    ) -> Result<(u8, [u16; vpn_common::MAX_WEB_PORTS]), ConfigError> {
        let mut ports = [0u16; vpn_common::MAX_WEB_PORTS];
        let Some(name) = &p.web_proxy else {
            if p.web_ports.is_some() {
                return Err(invalid(
                    "group_policy.web_ports",
                    format!(
                        "policy '{}': web_ports without web_proxy: name the [[web_proxy]] to send them to",
                        p.name
                    ),
                ));
            }
            return Ok((0, ports));
        };
        let Some(i) = self.web_proxies.iter().position(|w| &w.name == name) else {
            let known: Vec<&str> = self.web_proxies.iter().map(|w| w.name.as_str()).collect();
            return Err(invalid(
                "group_policy.web_proxy",
                format!(
                    "policy '{}': web proxy '{name}' is not configured (web proxies: {})",
                    p.name,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let list = p.web_ports.clone().unwrap_or_else(|| vec![80, 443]);
        if list.is_empty() || list.len() > ports.len() || list.contains(&0) {
            return Err(invalid(
                "group_policy.web_ports",
                format!(
                    "policy '{}': {list:?}: list 1 to {} TCP ports, none of them 0",
                    p.name,
                    ports.len()
                ),
            ));
        }
        ports[..list.len()].copy_from_slice(&list);
        Ok((i as u8 + 1, ports))
    }

    /// The addresses clients reach the gateway at, preferred first: the
    /// uplinks' `hostname`s by priority, else `tls.hostnames`, else the
    /// listening address, each with the port when it is not 443.
    fn profile_servers(&self) -> Vec<crate::profile::Server> {
        let port = self.server.listen.port();
        let with_port = |h: &str| {
            let bare_v6 = h.parse::<Ipv6Addr>().is_ok();
            match (port, bare_v6) {
                (443, false) => h.to_owned(),
                (443, true) => format!("[{h}]"),
                (_, true) => format!("[{h}]:{port}"),
                _ if h.ends_with(']') || !h.contains(':') => format!("{h}:{port}"),
                _ => h.to_owned(),
            }
        };
        let mut uplinks: Vec<&UplinkConfig> = self
            .uplinks
            .iter()
            .filter(|u| u.hostname.is_some())
            .collect();
        uplinks.sort_by_key(|u| u.priority);
        let several = uplinks.len() > 1;
        let mut servers: Vec<crate::profile::Server> = uplinks
            .iter()
            .filter_map(|u| {
                Some(crate::profile::Server {
                    via: several.then(|| u.name.clone()),
                    address: with_port(u.hostname.as_deref()?),
                })
            })
            .collect();
        if servers.is_empty() {
            let listen = self.server.listen.ip();
            let names: Vec<String> = if !self.tls.hostnames.is_empty() {
                self.tls.hostnames.clone()
            } else if !listen.is_unspecified() {
                vec![listen.to_string()]
            } else {
                vec!["vpn-gateway".into()]
            };
            servers = names
                .iter()
                .map(|h| crate::profile::Server {
                    via: None,
                    address: with_port(h),
                })
                .collect();
        }
        servers
    }

    /// Every group's client profile.
    fn profiles(&self, groups: &[GroupConfig]) -> Result<crate::profile::Profiles, ConfigError> {
        for u in &self.uplinks {
            if let Some(h) = &u.hostname
                && !crate::profile::is_host_address(h)
            {
                return Err(invalid(
                    "uplink.hostname",
                    format!(
                        "uplink '{}': '{h}' is not a host name or address: use e.g. vpn-isp1.example.com, vpn.example.com:8443 or an IP address",
                        u.name
                    ),
                ));
            }
        }
        let groups: Vec<crate::profile::GroupProfile<'_>> = groups
            .iter()
            .map(|g| crate::profile::GroupProfile {
                group: &g.name,
                options: g.profile.as_ref(),
            })
            .collect();
        crate::profile::Profiles::build(
            &self.profile,
            &groups,
            &self.profile_servers(),
            &self.server.name,
        )
        .map_err(|e| invalid(e.key, e.message))
    }
}

impl Config {
    fn validate_policies(
        &self,
        routing: &Routing,
        split: &[IpNet],
    ) -> Result<Vec<PolicyDef>, ConfigError> {
        let mut out: Vec<PolicyDef> = Vec::new();
        for p in &self.group_policies {
            if p.name.is_empty()
                || p.name.len() > 64
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(invalid(
                    "group_policy.name",
                    format!(
                        "'{}' is not a valid policy name: 1 to 64 letters, digits, '-', '_' or '.'",
                        p.name
                    ),
                ));
            }
            if out.iter().any(|o| o.name == p.name) {
                return Err(invalid(
                    "group_policy.name",
                    format!("'{}' is defined twice", p.name),
                ));
            }
            if p.rules.len() > 10_000 {
                return Err(invalid(
                    "group_policy.rule",
                    format!(
                        "policy '{}' has {} rules; at most 10000 are supported",
                        p.name,
                        p.rules.len()
                    ),
                ));
            }
            let mut rules = Vec::with_capacity(p.rules.len());
            for (i, r) in p.rules.iter().enumerate() {
                rules.push(Rule::parse(r).map_err(|m| {
                    invalid(
                        "group_policy.rule",
                        format!("policy '{}' rule {}: {m}", p.name, i + 1),
                    )
                })?);
            }
            if p.split_enforcement && !matches!(routing, Routing::Include(_)) {
                return Err(invalid(
                    "group_policy.split_enforcement",
                    format!(
                        "policy '{}' enforces split tunnelling, which needs client_routing mode 'include' (it is '{}')",
                        p.name, self.client_routing.mode
                    ),
                ));
            }
            policy::compile(0, &rules, 0, split, self.policy.max_entries)
                .map_err(|m| invalid("group_policy.rule", format!("policy '{}' {m}", p.name)))?;
            let mut flags = 0;
            if p.client_isolation {
                flags |= POLICY_ISOLATE;
            }
            if p.split_enforcement {
                flags |= POLICY_SPLIT_ENFORCE;
            }
            let schedule = match &p.schedule {
                None => None,
                Some(c) => Some((
                    Schedule::parse(c).map_err(|m| {
                        invalid("group_policy.schedule", format!("policy '{}': {m}", p.name))
                    })?,
                    c.fallback.clone(),
                )),
            };
            let uplink = match &p.uplink {
                None => 0,
                Some(name) => match self.uplinks.iter().position(|u| &u.name == name) {
                    Some(i) => i as u16 + 1,
                    None => {
                        let known: Vec<&str> =
                            self.uplinks.iter().map(|u| u.name.as_str()).collect();
                        return Err(invalid(
                            "group_policy.uplink",
                            format!(
                                "policy '{}': uplink '{name}' is not configured (uplinks: {})",
                                p.name,
                                if known.is_empty() {
                                    "none".into()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        ));
                    }
                },
            };
            let (web_proxy, web_ports) = self.policy_web_proxy(p)?;
            if let Some(url) = &p.web_proxy_pac_url
                && !((url.starts_with("http://") || url.starts_with("https://"))
                    && url.len() <= 512
                    && url.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(invalid(
                    "group_policy.web_proxy_pac_url",
                    format!(
                        "policy '{}': {url:?} is not an http:// or https:// URL of at most 512 printable characters without spaces",
                        p.name
                    ),
                ));
            }
            out.push(PolicyDef {
                name: p.name.clone(),
                schedule,
                rules,
                proxy_pac: p.web_proxy_pac_url.clone(),
                info: PolicyInfo {
                    flags,
                    uplink,
                    rate_up_bps: p.bandwidth_up_kbps.saturating_mul(1000),
                    rate_down_bps: p.bandwidth_down_kbps.saturating_mul(1000),
                    web_proxy,
                    web_ports,
                    web_fail_closed: u8::from(
                        p.web_proxy_down == crate::policy::WebProxyDown::Closed,
                    ),
                    ..Default::default()
                },
            });
        }
        for p in &out {
            if let Some((_, fb)) = &p.schedule {
                match out.iter().find(|o| &o.name == fb) {
                    None => {
                        return Err(invalid(
                            "group_policy.schedule.fallback",
                            format!(
                                "policy '{}': fallback '{fb}' names no [[group_policy]]",
                                p.name
                            ),
                        ));
                    }
                    Some(o) if o.schedule.is_some() => {
                        return Err(invalid(
                            "group_policy.schedule.fallback",
                            format!(
                                "policy '{}': fallback '{fb}' has a schedule itself; a fallback must always apply",
                                p.name
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(d) = &self.policy.default
            && !out.iter().any(|p| &p.name == d)
        {
            let names: Vec<&str> = out.iter().map(|p| p.name.as_str()).collect();
            return Err(invalid(
                "policy.default",
                format!(
                    "'{d}' names no [[group_policy]] (defined: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        Ok(out)
    }
}

impl ClientRouting {
    fn parse(&self) -> Result<Routing, ConfigError> {
        let mut nets = Vec::with_capacity(self.subnets.len());
        for s in &self.subnets {
            let net: IpNet = s.parse().map_err(|_| {
                invalid(
                    "client_routing.subnets",
                    format!("'{s}' is not a subnet in CIDR form (for example 198.18.2.0/24 or fd00:2::/64)"),
                )
            })?;
            nets.push(net.trunc());
        }
        match self.mode.as_str() {
            "all" => {
                if !nets.is_empty() {
                    return Err(invalid(
                        "client_routing.subnets",
                        "client routing mode 'all' takes no subnets: use mode 'include' or 'exclude' to list them",
                    ));
                }
                Ok(Routing::All)
            }
            "include" | "exclude" if nets.is_empty() => Err(invalid(
                "client_routing.subnets",
                format!(
                    "client routing mode '{}' needs at least one valid subnet in CIDR form",
                    self.mode
                ),
            )),
            "include" => Ok(Routing::Include(nets)),
            "exclude" => Ok(Routing::Exclude(nets)),
            other => Err(invalid(
                "client_routing.mode",
                format!("'{other}' is not a routing mode: use 'all', 'include' or 'exclude'"),
            )),
        }
    }
}

/// Parses `session.timeout`: `8h`, `1d`, `7d` or `<N>h` with 1 <= N <= 256.
pub fn parse_session_timeout(s: &str) -> Result<Duration, ConfigError> {
    let bad = || {
        invalid(
            "session.timeout",
            format!(
                "'{s}' is not a session timeout: use 8h, 1d, 7d, or a custom <N>h from 1h to 256h"
            ),
        )
    };
    let hours: u64 = match s {
        "1d" => 24,
        "7d" => 168,
        _ => {
            let n = s.strip_suffix('h').ok_or_else(bad)?;
            let n: u64 = n.parse().map_err(|_| bad())?;
            if !(1..=256).contains(&n) {
                return Err(bad());
            }
            n
        }
    };
    Ok(Duration::from_secs(hours * 3600))
}

/// `groups` without their `[group.profile]`s, which a reload applies.
fn without_profiles(groups: &[GroupConfig]) -> Vec<GroupConfig> {
    groups
        .iter()
        .map(|g| GroupConfig {
            profile: None,
            ..g.clone()
        })
        .collect()
}

/// `uplinks` without their `hostname`s (only in client profiles, which a
/// reload applies).
fn without_hostnames(uplinks: &[UplinkConfig]) -> Vec<UplinkConfig> {
    uplinks
        .iter()
        .map(|u| UplinkConfig {
            hostname: None,
            ..u.clone()
        })
        .collect()
}

impl Settings {
    /// The sections that differ in `new` and only take effect after a
    /// restart (group policies and the default policy change live).
    pub fn needs_restart(&self, new: &Settings) -> Vec<&'static str> {
        let (a, b) = (&self.raw, &new.raw);
        [
            ("server", a.server == b.server),
            // The CRL file is re-read by every reload.
            (
                "tls",
                TlsConfig {
                    client_crl_file: None,
                    ..a.tls.clone()
                } == TlsConfig {
                    client_crl_file: None,
                    ..b.tls.clone()
                },
            ),
            ("http", a.http == b.http),
            ("tunnel", a.tunnel == b.tunnel),
            ("client_routing", a.client_routing == b.client_routing),
            ("session", a.session == b.session),
            // The method and its servers apply to new logins at once.
            (
                "auth",
                AuthConfig {
                    method: b.auth.method,
                    ..a.auth.clone()
                } == b.auth,
            ),
            // The memory ceiling applies to new logins at once.
            (
                "limits",
                Limits {
                    max_memory_mib: b.limits.max_memory_mib,
                    ..a.limits.clone()
                } == b.limits,
            ),
            // Logins use new RADIUS servers at once; accounting and the
            // Disconnect/CoA port keep what they started with.
            (
                "radius",
                a.radius.accounting == b.radius.accounting
                    && a.radius.interim_secs == b.radius.interim_secs
                    && a.radius.dynamic_authorization == b.radius.dynamic_authorization
                    && (a.radius.servers == b.radius.servers
                        || !(b.radius.accounting || b.radius.dynamic_authorization.is_some())),
            ),
            // Client profiles apply to new logins at once.
            (
                "group",
                without_profiles(&a.groups) == without_profiles(&b.groups),
            ),
            ("dtls", a.dtls == b.dtls),
            (
                "uplink",
                without_hostnames(&a.uplinks) == without_hostnames(&b.uplinks),
            ),
            ("failover", a.failover == b.failover),
            ("web_proxy", a.web_proxies == b.web_proxies),
            ("metrics", a.metrics == b.metrics),
            ("identity_feed", a.identity_feed == b.identity_feed),
        ]
        .into_iter()
        .filter_map(|(name, same)| (!same).then_some(name))
        .collect()
    }

    /// The gateway's own address on the tunnel device (first host of the pool).
    pub fn gateway_v4(&self) -> Ipv4Addr {
        self.pool_v4
            .hosts()
            .next()
            .expect("validated pool has hosts")
    }

    /// The gateway's own IPv6 address on the tunnel device (prefix + 1).
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.pool_v6
            .map(|n| Ipv6Addr::from(u128::from(n.network()) + 1))
    }

    pub fn policy(&self, name: &str) -> Option<&PolicyDef> {
        self.policies.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<Settings, ConfigError> {
        let text = format!("[tunnel]\npool_v4 = \"198.19.0.0/24\"\n{extra}");
        Config::parse(&text, Path::new("test.toml"))
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = include_str!("../../examples/gateway.toml");
        let s = Config::parse(text, Path::new("examples/gateway.toml")).unwrap();
        assert_eq!(s.groups.len(), 2);
        assert!(matches!(s.tunnel.routing, Routing::Include(ref n) if n.len() == 2));
    }

    #[test]
    fn the_documented_uplinks_are_valid_and_mistakes_are_named() {
        // The example's commented uplink block, uncommented.
        let text = include_str!("../../examples/gateway.toml");
        let block = text.split("# [failover]").nth(1).unwrap();
        let uplinks: String = std::iter::once("[failover]")
            .chain(block.lines().skip(1))
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let s = parse(&uplinks).unwrap();
        assert_eq!(s.uplinks.len(), 2);
        assert_eq!(s.uplinks[0].probe.interval_ms, 500);
        assert_eq!(s.uplinks[1].priority, 20);
        assert!(s.uplinks[1].masquerade);
        assert_eq!(
            s.uplinks[0].hostname.as_deref(),
            Some("vpn-isp1.example.com")
        );

        let two = |a: &str, b: &str| {
            format!(
                "[[uplink]]\nname = \"{a}\"\ninterface = \"wan1\"\ngateway = \"198.18.10.2\"\n\n[[uplink]]\nname = \"{b}\"\ninterface = \"wan2\"\ngateway = \"198.18.11.2\"\n"
            )
        };
        let e = parse(&two("isp", "isp")).unwrap_err().to_string();
        assert!(e.contains("uplink.name") && e.contains("'isp'"), "{e}");
        let e = parse(&format!(
            "{}\n[failover]\ntable_base = 254\n",
            two("a", "b")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("failover.table_base") && e.contains("253-255"),
            "{e}"
        );
        let e = parse(&format!(
            "{}[uplink.probe]\ninterval_ms = 50\n",
            two("a", "b")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("interval_ms 50"), "{e}");
        let e = parse(&format!(
            "{}\n[[group_policy]]\nname = \"p\"\nuplink = \"isp9\"\n",
            two("a", "b")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("group_policy.uplink") && e.contains("'isp9'") && e.contains("a, b"),
            "{e}"
        );
    }

    #[test]
    fn radius_settings_are_validated_and_mistakes_named() {
        let ok = parse(
            "[auth]\nmethod = \"radius\"\n[radius]\ntimeout_ms = 800\n\
             [[radius.server]]\naddress = \"198.18.2.2:1812\"\nsecret = \"s\"\n\
             [[radius.server]]\naddress = \"[fd00::2]:1812\"\nsecret = \"t\"\n\
             require_message_authenticator = false\n",
        )
        .unwrap();
        let r = ok.radius.unwrap();
        assert_eq!(r.servers.len(), 2);
        assert_eq!(r.timeout, Duration::from_millis(800));
        assert_eq!(r.tries, 2);
        assert!(r.servers[0].require_message_authenticator);
        assert!(!r.servers[1].require_message_authenticator);
        // Servers listed but not used: no RADIUS settings.
        assert!(
            parse("[[radius.server]]\naddress = \"198.18.2.2:1812\"\nsecret = \"s\"\n")
                .unwrap()
                .radius
                .is_none()
        );
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert!(err("[auth]\nmethod = \"radius\"\n").contains("radius.server"));
        assert!(
            err("[auth]\nmethod = \"radius\"\n[[radius.server]]\naddress = \"radius1\"\nsecret = \"s\"\n")
                .contains("'radius1' is not IP:port")
        );
        assert!(
            err("[auth]\nmethod = \"radius\"\n[[radius.server]]\naddress = \"198.18.2.2:1812\"\nsecret = \"\"\n")
                .contains("secret for 198.18.2.2:1812 is empty")
        );
        assert!(err("[auth]\nmethod = \"ldap\"\n").contains("ldap"));
    }

    #[test]
    fn certificate_groups_need_a_client_ca() {
        let g = "[[group]]\nname = \"certs\"\nauth = \"certificate+password\"\n";
        let e = parse(g).unwrap_err().to_string();
        assert!(e.contains("group 'certs' needs client certificates"), "{e}");
        assert!(e.contains("tls.client_ca_file"), "{e}");
        let s = parse(&format!("[tls]\nclient_ca_file = \"/ca.pem\"\n{g}")).unwrap();
        assert_eq!(s.groups[0].auth, GroupAuth::CertificateAndPassword);
        assert!(s.groups[0].cert_name_must_match);
        let e = parse("[[group]]\nname = \"x\"\nauth = \"token\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("token"), "{e}");
    }

    #[test]
    fn a_group_may_have_its_own_method_and_backends_reload_without_restart() {
        let g =
            "[[group]]\nname = \"staff\"\n[[group]]\nname = \"contractors\"\nmethod = \"radius\"\n";
        let e = parse(g).unwrap_err().to_string();
        assert!(e.contains("radius.server"), "{e}");
        let server = |port: u16, acct: bool| {
            format!(
                "{g}[radius]\naccounting = {acct}\n[[radius.server]]\naddress = \"198.18.2.2:{port}\"\nsecret = \"s\"\n"
            )
        };
        let a = parse(&server(1812, false)).unwrap();
        assert_eq!(a.groups[1].method, Some(AuthMethod::Radius));
        assert!(a.radius.is_some() && a.ldap.is_none());
        // New servers: applied to logins at once...
        assert!(
            a.needs_restart(&parse(&server(1999, false)).unwrap())
                .is_empty()
        );
        // ... but accounting keeps its start-up servers.
        let b = parse(&server(1812, true)).unwrap();
        assert_eq!(
            b.needs_restart(&parse(&server(1999, true)).unwrap()),
            vec!["radius"]
        );
        // The default method changes at once too (accounting, newly on,
        // waits for a restart).
        let local = parse("").unwrap();
        let radius = parse(&format!(
            "[auth]\nmethod = \"radius\"\n{}",
            server(1812, true)
        ))
        .unwrap();
        assert_eq!(local.needs_restart(&radius), vec!["radius", "group"]);
    }

    #[test]
    fn the_documented_ldap_section_is_valid() {
        let text = include_str!("../../examples/gateway.toml")
            .replace("method = \"local\"", "method = \"ldap\"");
        let s = Config::parse(&text, Path::new("examples/gateway.toml")).unwrap();
        let l = s.ldap.unwrap();
        assert_eq!(l.servers.len(), 2);
        assert!(matches!(l.groups, GroupLookup::Search { .. }));
    }

    #[test]
    fn ldap_settings_are_validated_and_mistakes_named() {
        let pol = "[[group_policy]]\nname = \"eng\"\n";
        let ok = parse(&format!(
            "[auth]\nmethod = \"ldap\"\n{pol}[ldap]\n\
             servers = [\"ldaps://198.18.2.2\", \"ldap://198.18.2.3\"]\n\
             search_base = \"dc=example,dc=org\"\ngroup_base = \"ou=groups,dc=example,dc=org\"\n\
             [[ldap.group_map]]\ngroup = \"vpn-eng\"\npolicy = \"eng\"\n"
        ))
        .unwrap();
        let l = ok.ldap.unwrap();
        assert_eq!(
            l.servers,
            vec![
                ("ldaps://198.18.2.2".to_owned(), false),
                ("ldap://198.18.2.3".to_owned(), true)
            ]
        );
        assert!(matches!(l.user, UserLookup::Search { service: None, .. }));
        let err = |t: &str| {
            parse(&format!("[auth]\nmethod = \"ldap\"\n{pol}[ldap]\n{t}"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("").contains("ldap.servers is empty"));
        assert!(
            err("servers = [\"ldap://h\"]\nstarttls = false\nbind_dn = \"uid={user}\"\n")
                .contains("passwords in clear")
        );
        assert!(err("servers = [\"http://h\"]\n").contains("not an ldaps:// or ldap:// URL"));
        assert!(err("servers = [\"ldaps://h\"]\nbind_dn = \"uid=x\"\n").contains("no {user}"));
        assert!(
            err("servers = [\"ldaps://h\"]\nbind_dn = \"uid={user}\"\nsearch_base = \"dc=x\"\n")
                .contains("not both or neither")
        );
        assert!(
            err(
                "servers = [\"ldaps://h\"]\nbind_dn = \"uid={user}\"\ngroup_base = \"dc=x\"\n\
                 [[ldap.group_map]]\ngroup = \"g\"\npolicy = \"nope\"\n"
            )
            .contains("policy 'nope', which no [[group_policy]] defines")
        );
        assert!(
            err("servers = [\"ldaps://h\"]\nbind_dn = \"uid={user}\"\n\
                 [[ldap.group_map]]\ngroup = \"g\"\npolicy = \"eng\"\n")
            .contains("needs group_attribute or group_base")
        );
    }

    #[test]
    fn minimal_config_has_safe_defaults() {
        let s = parse("").unwrap();
        assert_eq!(s.tunnel.routing, Routing::All);
        assert_eq!(s.tunnel.session_timeout, Duration::from_secs(8 * 3600));
        assert_eq!(s.gateway_v4(), Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(s.groups.len(), 1);
        assert_eq!(s.http.max_header_bytes, 16384);
    }

    #[test]
    fn include_without_subnets_is_rejected_with_the_documented_message() {
        let e = parse("[client_routing]\nmode = \"include\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config key 'client_routing.subnets': client routing mode 'include' needs at least one valid subnet in CIDR form"
        );
    }

    #[test]
    fn bad_subnet_names_the_value() {
        let e = parse("[client_routing]\nmode = \"exclude\"\nsubnets = [\"198.18.2.0/33\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'198.18.2.0/33'"), "{e}");
        assert!(e.contains("client_routing.subnets"), "{e}");
    }

    #[test]
    fn unknown_mode_lists_valid_modes() {
        let e = parse("[client_routing]\nmode = \"split\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'split'") && e.contains("'all', 'include' or 'exclude'"),
            "{e}"
        );
    }

    #[test]
    fn settings_hold_final_values() {
        let s = parse("").unwrap();
        assert!(s.tls.tls13 && s.tls.read_batching, "both default on");
        assert_eq!(
            s.dtls.as_ref().unwrap().listen.port(),
            s.server.listen.port()
        );
        assert_eq!(s.session.dpd, Duration::from_secs(s.tunnel.dpd_secs));
        let s = parse("[tls]\ntls13 = false\n[dtls]\nport = 4443\n").unwrap();
        assert!(!s.tls.tls13);
        assert_eq!(s.dtls.unwrap().listen.port(), 4443);
        assert!(parse("[dtls]\nenabled = false\n").unwrap().dtls.is_none());
    }

    #[test]
    fn a_reload_names_the_sections_that_need_a_restart() {
        let old = parse("").unwrap();
        let policy_only =
            parse("[[group_policy]]\nname = \"p\"\n[policy]\ndefault = \"p\"\n").unwrap();
        assert!(
            old.needs_restart(&policy_only).is_empty(),
            "policies change live"
        );
        let new = parse("[limits]\nmax_connections = 10\n[session]\ndpd_secs = 5\n").unwrap();
        assert_eq!(old.needs_restart(&new), ["session", "limits"]);
        let ceiling = parse("[limits]\nmax_memory_mib = 512\n").unwrap();
        assert!(
            old.needs_restart(&ceiling).is_empty(),
            "the memory ceiling applies at once"
        );
    }

    #[test]
    fn profiles_list_the_uplinks_by_priority_and_change_live() {
        let uplinks = |h1: &str| {
            format!(
                "[server]\nlisten = \"198.18.0.1:8443\"\n\
                 [[group]]\nname = \"staff\"\n[group.profile]\nalways_on = true\n\
                 [[group]]\nname = \"guests\"\n\
                 [profile]\ntrusted_dns_domains = [\"corp.example.com\"]\n\
                 [[uplink]]\nname = \"isp2\"\ninterface = \"wan2\"\ngateway = \"198.18.11.2\"\npriority = 200\nhostname = \"vpn2.example.com\"\n\
                 [[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"198.18.10.2\"\nhostname = \"{h1}\"\n"
            )
        };
        let s = parse(&uplinks("vpn1.example.com")).unwrap();
        let staff = s.profiles.of_group("staff").unwrap();
        let x = std::str::from_utf8(&staff.bytes).unwrap();
        // By priority, with the listening port, and each the other's backup.
        let first = x
            .find("<HostAddress>vpn1.example.com:8443</HostAddress>")
            .unwrap();
        let second = x
            .find("<HostAddress>vpn2.example.com:8443</HostAddress>")
            .unwrap();
        assert!(first < second, "{x}");
        assert!(x.contains("<HostName>vpn-gateway (isp1)</HostName>"), "{x}");
        assert!(x.contains("<AlwaysOn>true"), "{x}");
        let guests = s.profiles.of_group("guests").unwrap();
        assert!(
            std::str::from_utf8(&guests.bytes)
                .unwrap()
                .contains("<AlwaysOn>false")
        );
        // A new name is a new file, and needs no restart.
        let t = parse(&uplinks("vpn1.example.net")).unwrap();
        assert_ne!(t.profiles.of_group("staff").unwrap().sha1, staff.sha1);
        assert!(s.needs_restart(&t).is_empty(), "{:?}", s.needs_restart(&t));
        let e = parse(&uplinks("vpn 1")).unwrap_err().to_string();
        assert!(
            e.starts_with("config key 'uplink.hostname': uplink 'isp1': 'vpn 1' is not"),
            "{e}"
        );
        // Without uplink names: the certificate's names.
        let s = parse("[tls]\nhostnames = [\"vpn.example.com\"]\n").unwrap();
        let x = s.profiles.of_group("default").unwrap();
        assert!(
            std::str::from_utf8(&x.bytes)
                .unwrap()
                .contains("<HostAddress>vpn.example.com</HostAddress>")
        );
        let e = parse("[profile]\nalways_on = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config key 'profile.always_on'"), "{e}");
    }

    #[test]
    fn the_identity_feed_needs_a_long_secret_and_bounded_sizes() {
        assert!(parse("").unwrap().identity_feed.is_none());
        let e = parse("[identity_feed]\nenabled = true\nsecret = \"short\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config key 'identity_feed.secret': a secret of 5 characters"),
            "{e}"
        );
        let e = parse("[identity_feed]\nhistory = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("identity_feed.history") && e.contains("1 to 1000000"),
            "{e}"
        );
        let s = parse(
            "[identity_feed]\nenabled = true\nsecret = \"0123456789abcdef\"\nlisten = \"198.18.2.1:9443\"\n",
        )
        .unwrap();
        let f = s.identity_feed.unwrap();
        assert_eq!(
            (f.listen.port(), f.history, f.max_consumers),
            (9443, 10_000, 16)
        );
    }

    #[test]
    fn web_proxies_and_the_policies_that_use_them() {
        let proxy = "[[web_proxy]]\nname = \"squid\"\naddress = \"198.18.5.2\"\n";
        let s = parse(&format!(
            "{proxy}[[group_policy]]\nname = \"web\"\nweb_proxy = \"squid\"\nweb_proxy_down = \"closed\"\n"
        ))
        .unwrap();
        let info = s.policy("web").unwrap().info;
        assert_eq!(
            (info.web_proxy, info.web_ports, info.web_fail_closed),
            (1, [80, 443, 0, 0], 1)
        );
        assert_eq!(s.web_proxies[0].probe_port, 3128);
        let err = |text: &str| parse(text).unwrap_err().to_string();
        let e = err("[[group_policy]]\nname = \"web\"\nweb_proxy = \"squid\"\n");
        assert!(
            e.contains("group_policy.web_proxy")
                && e.contains("'squid' is not configured (web proxies: none)"),
            "{e}"
        );
        let e = err(&format!(
            "{proxy}[[group_policy]]\nname = \"web\"\nweb_proxy = \"squid\"\nweb_ports = [80, 443, 8080, 8443, 3000]\n"
        ));
        assert!(
            e.contains("group_policy.web_ports") && e.contains("1 to 4 TCP ports"),
            "{e}"
        );
        let e = err(
            "[[group_policy]]\nname = \"web\"\nweb_proxy_pac_url = \"http://x/p.pac\\r\\nX-Evil: 1\"\n",
        );
        assert!(e.contains("group_policy.web_proxy_pac_url"), "{e}");
        let s = parse(
            "[[group_policy]]\nname = \"web\"\nweb_proxy_pac_url = \"https://198.18.5.2/p.pac\"\n",
        )
        .unwrap();
        assert_eq!(
            s.policy("web").unwrap().proxy_pac.as_deref(),
            Some("https://198.18.5.2/p.pac")
        );
        let e = err("[[group_policy]]\nname = \"web\"\nweb_ports = [80]\n");
        assert!(e.contains("web_ports without web_proxy"), "{e}");
        let e = err(&format!("{proxy}[failover]\nrule_priority = 10\n"));
        assert!(
            e.contains("failover.rule_priority") && e.contains("use 17 or more"),
            "{e}"
        );
        let e = err("[[web_proxy]]\nname = \"squid\"\naddress = \"127.0.0.1\"\n");
        assert!(
            e.contains("web_proxy.address") && e.contains("127.0.0.1"),
            "{e}"
        );
        let e = err(&format!("{proxy}{proxy}"));
        assert!(e.contains("web_proxy.name") && e.contains("'squid'"), "{e}");
    }

    #[test]
    fn rx_coalescing_defaults_on_and_is_bounded() {
        let coalesce = |text: &str| parse(text).unwrap().dtls.unwrap().coalesce;
        assert_eq!(coalesce(""), Duration::from_micros(200));
        assert_eq!(coalesce("[dtls]\nrx_coalesce_usecs = 0\n"), Duration::ZERO);
        let e = parse("[dtls]\nrx_coalesce_usecs = 5000\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config key 'dtls.rx_coalesce_usecs': 5000 is out of range: use 0 (off) to 1000 microseconds"
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = parse("[session]\ntimeuot = \"8h\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeuot"), "{e}");
    }

    #[test]
    fn session_timeouts() {
        assert_eq!(
            parse_session_timeout("1d").unwrap(),
            Duration::from_secs(86400)
        );
        assert_eq!(
            parse_session_timeout("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            parse_session_timeout("256h").unwrap(),
            Duration::from_secs(256 * 3600)
        );
        for bad in ["257h", "0h", "2d", "forever", ""] {
            let e = parse_session_timeout(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn max_sessions_must_fit_the_pool() {
        let e = parse("[server]\nmax_sessions = 300\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.max_sessions") && e.contains("253"),
            "{e}"
        );
    }

    #[test]
    fn pool_v6_gateway_address() {
        let s = parse("pool_v6 = \"fd00:1::/64\"\n").unwrap();
        assert_eq!(s.gateway_v6(), Some("fd00:1::1".parse().unwrap()));
    }

    #[test]
    fn cert_without_key_is_rejected() {
        let e = parse("[tls]\ncert_file = \"/x.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.key_file"), "{e}");
    }

    #[test]
    fn policies_validate_with_clear_errors() {
        let ok = parse(
            "[policy]\ndefault = \"staff\"\n[[group_policy]]\nname = \"staff\"\nclient_isolation = true\nbandwidth_up_kbps = 5000\n[[group_policy.rule]]\naction = \"deny\"\nprotocol = \"udp\"\ncomment = \"No UDP\"\n",
        )
        .unwrap();
        let p = ok.policy("staff").unwrap();
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.info.flags, POLICY_ISOLATE);
        assert_eq!(p.info.rate_up_bps, 5_000_000);
        let e = parse("[policy]\ndefault = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'nope' names no [[group_policy]]"), "{e}");
        let e = parse("[[group_policy]]\nname = \"a\"\n[[group_policy.rule]]\naction = \"drop\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy 'a' rule 1: action 'drop'"), "{e}");
        let e = parse("[[group_policy]]\nname = \"a\"\nsplit_enforcement = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs client_routing mode 'include'"), "{e}");
    }
}
