//! What `vpnd` and `vpnctl` say to each other over the control socket
//! (one JSON request line, one JSON answer line): the requests, the
//! answers, and the figures they carry. Plain data that imports nothing
//! from the crate, so the protocol can be read, and kept compatible, in
//! one place; each service fills in its own figures.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Sessions,
    /// Ends every session of a user name, or the session holding an address.
    Disconnect {
        target: String,
    },
    Stats,
    /// Re-read the config file (`gateway::Gateway::reload`).
    Reload,
    /// Installed group policies.
    Policies,
    /// One policy with its rules and their hit counters.
    Policy {
        name: String,
    },
    /// The uplinks: health, role, traffic.
    Uplinks,
    /// The web proxies: health and probes.
    WebProxies,
    /// Everything about the sessions of a user name, or the session
    /// holding an address.
    Show {
        target: String,
    },
    /// Events of the event log, oldest first.
    Events(EventQuery),
    /// Bans in force (`vpnctl ban list`).
    Bans,
    /// Bans a prefix (`vpnctl ban add`) for `secs` (None: until lifted).
    Ban {
        source: String,
        #[serde(default)]
        secs: Option<u64>,
    },
    /// Lifts the ban of a prefix (`vpnctl ban remove`).
    Unban {
        source: String,
    },
}

/// Which events `vpnctl events` wants.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventQuery {
    /// Byte offset in the log to read from (the `next` of an earlier
    /// answer: `--follow`); None = the last `limit` that match.
    #[serde(default)]
    pub from: Option<u64>,
    /// Only events of this user.
    #[serde(default)]
    pub user: Option<String>,
    /// Only events of this type (`client_connected`, ...).
    #[serde(default)]
    pub kind: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<String>,
    /// At most this many, the newest.
    #[serde(default)]
    pub limit: usize,
}

/// The answer to [`Request::Sessions`] on its own (`control::call_as`).
#[derive(Debug, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionRow>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Sessions {
        sessions: Vec<SessionRow>,
    },
    Disconnected {
        disconnected: usize,
    },
    Stats {
        stats: Box<Stats>,
    },
    Reloaded {
        reloaded: String,
    },
    Policies {
        policies: Vec<PolicyRow>,
    },
    Policy {
        policy: PolicyRow,
        rules: Vec<RuleRow>,
    },
    Uplinks {
        uplinks: Vec<UplinkRow>,
    },
    WebProxies {
        web_proxies: Vec<WebProxyRow>,
    },
    Show {
        details: Vec<SessionDetail>,
    },
    Events {
        events: Vec<serde_json::Value>,
        /// Where the next `--follow` read starts.
        next: u64,
    },
    Bans {
        bans: Vec<BanRow>,
    },
    Banned {
        banned: BanRow,
    },
    Unbanned {
        unbanned: BanRow,
    },
    Error {
        error: String,
    },
}

/// One row of `vpnctl sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRow {
    pub id: u64,
    pub user: String,
    pub group: String,
    pub vpn_address: String,
    pub vpn_address6: Option<String>,
    pub public_address: Option<String>,
    pub public_port: Option<u16>,
    /// The client's UDP address and port while DTLS is up (it can differ
    /// from the TLS one behind NAT, and moves on NAT rebinding).
    #[serde(default)]
    pub dtls_peer: Option<String>,
    /// RFC 3339 time of login.
    pub since: String,
    /// `connected`, or `disconnected` (resumable with the cookie).
    pub state: String,
    pub transport: String,
    /// The group policy in force, if any.
    pub group_policy: Option<String>,
    pub denied_in: u64,
    pub denied_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub pseudo_mac: String,
    /// Packets from the client with another source than its own VPN
    /// address, dropped before the tunnel device.
    #[serde(default)]
    pub spoofed_dropped: u64,
}

/// `vpnctl show`: one session whole.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionDetail {
    pub session: SessionRow,
    /// "local", "radius", "ldap" or "certificate".
    pub authenticated_by: String,
    /// The client's public address at login.
    pub login_from: String,
    /// What the client was told at CONNECT.
    pub pushed: Pushed,
    /// Seconds until each timer ends the session.
    pub timers: Timers,
    /// The rules of its policy, with their hits (all sessions of the
    /// policy together).
    pub rules: Vec<RuleRow>,
}

/// What CONNECT told a client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pushed {
    /// `address/prefix`.
    pub address: String,
    pub address6: Option<String>,
    pub dns: Vec<String>,
    pub default_domain: Option<String>,
    /// "all", "include" or "exclude".
    pub routing: String,
    /// The split networks (include or exclude).
    pub routes: Vec<String>,
    pub local_lan_access: bool,
    pub mtu: u16,
    pub session_timeout_secs: u64,
    /// 0 = none.
    pub idle_timeout_secs: u64,
    pub disconnected_timeout_secs: u64,
    pub dpd_secs: u64,
    pub keepalive_secs: u64,
    pub banner: Option<String>,
}

/// Seconds left until a timer ends a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timers {
    pub session_left_secs: u64,
    /// None: no idle timeout.
    pub idle_left_secs: Option<u64>,
    /// While no tunnel is up.
    pub disconnected_left_secs: Option<u64>,
}

/// One row of `vpnctl policy list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRow {
    pub name: String,
    pub id: u32,
    pub rules: usize,
    pub sessions: usize,
    pub default: bool,
    pub client_isolation: bool,
    pub split_enforcement: bool,
    pub bandwidth_up_kbps: u64,
    pub bandwidth_down_kbps: u64,
    pub map_entries: usize,
}

/// One rule of `vpnctl policy show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleRow {
    pub index: usize,
    pub rule: String,
    pub comment: Option<String>,
    pub hits: u64,
}

/// What `vpnctl uplinks` shows of one uplink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkRow {
    pub name: String,
    pub interface: String,
    pub priority: u32,
    /// `active` or `standby`.
    pub role: String,
    /// `up` or `down` (carrier and probe).
    pub state: String,
    pub carrier: bool,
    pub probe_target: String,
    pub consecutive_failures: u32,
    pub last_rtt_ms: Option<f64>,
    pub probes_sent: u64,
    pub probes_lost: u64,
    pub address: Option<String>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What `vpnctl web-proxies` shows of one web proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebProxyRow {
    pub name: String,
    pub address: String,
    /// `address:port` the health probe connects to.
    pub probe: String,
    /// `up` or `down`.
    pub state: String,
    pub consecutive_failures: u32,
    pub probes_sent: u64,
    pub probes_failed: u64,
    /// Seconds since the state last changed (or since start).
    pub state_secs: u64,
}

/// The kernel offloads the data path uses (`datapath/offloads.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offloads {
    /// TSO and checksum offload on the TUN device.
    pub tun_tso: bool,
    /// UDP segmentation offload for DTLS sends.
    pub udp_gso: bool,
    /// UDP receive offload for DTLS receives.
    pub udp_gro: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub sessions: usize,
    pub max_sessions: u32,
    pub pool_in_use: usize,
    pub pool_capacity: u32,
    /// Packets dropped by the BPF programs, per reason.
    pub drops: Vec<(String, u64)>,
    /// Packets the daemon dropped before the tunnel device, per reason.
    #[serde(default)]
    pub daemon_drops: Vec<(String, u64)>,
    /// The kernel offloads in use (absent from daemons before them).
    #[serde(default)]
    pub offloads: Option<Offloads>,
    /// The DTLS receive counters (absent with DTLS off).
    #[serde(default)]
    pub dtls_rx: Option<RxStats>,
    /// DTLS handshakes and rebindings (absent with DTLS off).
    #[serde(default)]
    pub dtls_handshakes: Option<HandshakeStats>,
    /// Download flow control towards DTLS clients (absent with DTLS off).
    #[serde(default)]
    pub dtls_flow_control: Option<FlowControlStats>,
    /// Rate-limited DTLS clients' packets paced by the workers (absent
    /// with DTLS off).
    #[serde(default)]
    pub dtls_pacing: Option<PacingStats>,
    /// Reads of TLS tunnels (`transport/read_batch.rs`).
    #[serde(default)]
    pub tls_reads: ReadStats,
    /// Limits before authentication: what is in use and what was refused
    /// (`[limits]`, `auth/admission.rs`).
    #[serde(default)]
    pub admission: AdmissionStats,
    /// RADIUS accounting records (absent without accounting).
    #[serde(default)]
    pub accounting: Option<AccountingStats>,
    /// Ban points (`[ban]`, `auth/bans.rs`).
    #[serde(default)]
    pub bans: BanStats,
}

/// Ban points: bans and the offences that scored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BanStats {
    /// Bans in force (or ended and not yet swept), now.
    pub active: usize,
    /// Sources with a score now.
    pub scored_sources: usize,
    /// Bans made by points since the start.
    pub banned_total: u64,
    /// Connections closed at accept because their source was banned
    /// (those the XDP guard did not drop first).
    pub refused_at_accept: u64,
    /// Offences scored, by kind.
    pub offences: Vec<(String, u64)>,
}

/// One row of `vpnctl ban list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BanRow {
    pub source: String,
    /// RFC 3339.
    pub since: String,
    /// Seconds left; None = until lifted.
    pub secs_left: Option<u64>,
    pub reason: String,
}

/// What RADIUS accounting sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountingStats {
    /// Records a server answered.
    pub sent: u64,
    /// Records no server answered.
    pub failed: u64,
    /// Records dropped because the queue was full.
    pub dropped: u64,
    /// Records waiting, now.
    pub pending: u64,
}

/// A snapshot of the admission state and counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdmissionStats {
    /// Connections that are not tunnels, now.
    pub connections: usize,
    pub max_connections: usize,
    pub max_connections_per_source: u32,
    /// Connections refused because all `max_connections` were in use.
    pub connections_refused_total: u64,
    /// Connections refused because their source held
    /// `max_connections_per_source`.
    pub connections_refused_source: u64,
    /// Connections closed after `max_requests_per_connection` requests.
    pub connections_closed_requests: u64,
    /// Connections closed after `max_connection_secs` without a tunnel.
    pub connections_closed_lifetime: u64,
    /// Logins in progress now.
    pub pending_logins: usize,
    pub max_pending_logins: usize,
    /// Logins refused because `max_pending_logins` were in progress.
    pub logins_refused_busy: u64,
    /// Logins refused because their source had
    /// `max_pending_logins_per_source` in progress.
    pub logins_refused_source_busy: u64,
    /// Login attempts refused because their source was locked out.
    pub logins_refused_source_locked: u64,
    /// Login attempts refused because their user was locked out (from an
    /// address the user had not logged in from).
    pub logins_refused_user_locked: u64,
    /// Sources and users locked out now.
    pub sources_locked: usize,
    pub users_locked: usize,
    /// Password checks refused because `max_queued_verifications` waited.
    pub verifications_refused_busy: u64,
    /// Password checks running or waiting now.
    pub verifications_in_progress: usize,
    /// The daemon's resident memory now, and `limits.max_memory_mib` in
    /// bytes (0: no ceiling).
    pub resident_bytes: u64,
    pub max_memory_bytes: u64,
    /// Logins refused because resident memory was above the ceiling.
    pub logins_refused_memory: u64,
    /// Connections accepted at the descriptor limit only to be told so.
    pub connections_refused_descriptors: u64,
}

/// A snapshot of the DTLS receive counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RxStats {
    /// `recvmmsg` calls that returned datagrams.
    pub batches: u64,
    /// Datagrams received (each one of a GRO-merged message counts).
    pub datagrams: u64,
    /// Waits of `rx_coalesce_usecs` after a bulk batch.
    pub coalesce_waits: u64,
    /// Pure ACKs from clients dropped as redundant (`packet/gro.rs`).
    pub acks_thinned: u64,
    /// Datagrams of application data dropped because the lengths in their
    /// record headers do not tile them with legal records.
    #[serde(default)]
    pub malformed: u64,
    /// (Send side) messages of several datagrams sent with UDP GSO: 0 with
    /// the offload off (`tunnel.offloads`, or a kernel without it).
    #[serde(default)]
    pub gso_messages: u64,
    /// Each packet worker's share (`transport/workers.rs`).
    #[serde(default)]
    pub workers: Vec<WorkerStats>,
}

/// What one packet worker carried for DTLS clients. A client's datagrams
/// reach one worker's socket, and its downloads come back to the same
/// worker (`datapath/tun.rs`), so both figures grow together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Datagrams received on its socket.
    pub datagrams_in: u64,
    /// Packets it sealed and sent to clients.
    pub packets_out: u64,
}

/// A snapshot of the handshake counters, for `vpnctl stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HandshakeStats {
    /// Handshakes in progress now.
    pub in_progress: usize,
    pub max: usize,
    pub max_per_source: u32,
    /// ClientHellos refused: all `max_handshakes` in progress.
    pub refused_total: u64,
    /// ClientHellos refused: their source had `max_handshakes_per_source`.
    pub refused_per_source: u64,
    /// ClientHellos refused: their offer had
    /// `MAX_HANDSHAKES_PER_OFFER` (4) in progress.
    pub refused_per_offer: u64,
    /// Completed handshakes refused because they were not the one their
    /// offer allows (`handshake.rs`).
    pub refused_after: u64,
    /// Established channels still holding OpenSSL's state (about 33 KiB
    /// each), which goes at their client's first record.
    #[serde(default)]
    pub holding_openssl: usize,
    /// Channels that followed their client to a new address.
    pub rebinds: u64,
    /// Records from unknown addresses not tried: their source's trial
    /// budget was spent.
    pub rebind_trials_refused: u64,
}

/// A snapshot of the download flow-control counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowControlStats {
    /// Packets a worker held because their client's window was full.
    pub waits: u64,
    /// Microseconds they were held in all.
    pub wait_us: u64,
    /// Times a client's packets stopped being held for a while because its
    /// window kept not opening (`flow_control::OVERDUE_PER_SEC`).
    #[serde(default)]
    pub holds_stopped: u64,
    /// Packets dropped because their client's queue of held packets was
    /// full (`dtls::held::CLIENT_BYTES`): the client's path is saturated.
    #[serde(default)]
    pub dropped_client_full: u64,
    /// Packets dropped because all of a worker's queues of held packets
    /// were full (`dtls::held::WORKER_BYTES`, `CLIENTS`).
    #[serde(default)]
    pub dropped_worker_full: u64,
    /// Packets for other clients a worker passed on while it held some
    /// client's: what a worker that stopped reading at each hold (before
    /// `dtls::held`) would have kept waiting.
    #[serde(default)]
    pub passed_while_held: u64,
}

/// What the workers did with rate-limited DTLS clients' packets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PacingStats {
    /// Uploads that waited in a worker's paced queue.
    pub up_delayed: u64,
    /// Downloads that waited in a worker's paced queue.
    pub down_delayed: u64,
    /// Packets dropped: they would have waited longer than the paced
    /// queue's 200 ms, or the queue was full.
    pub dropped: u64,
}

/// How the TLS tunnels' reads were batched (`transport/read_batch.rs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadStats {
    /// Wake-ups of TLS tunnels that read data.
    pub wakeups: u64,
    /// Bytes of TLS plaintext those wake-ups read.
    pub bytes: u64,
    /// Times a tunnel started batching its reads.
    pub batching_started: u64,
    /// Tail waits that found data waiting (each starts a hold-off).
    pub tail_stalls: u64,
}
