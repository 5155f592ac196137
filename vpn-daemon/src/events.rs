//! Structured events: one JSON object per line on the configured event log,
//! and the same event through `tracing`.

use std::{fs::File, io::Write, path::Path, time::SystemTime};

use parking_lot::Mutex;

use serde::Serialize;

/// Something an admin wants to see in the event log.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    ClientConnected {
        session_id: u64,
        user: String,
        group: String,
        vpn_address: String,
        public_address: String,
        pseudo_mac: String,
        resumed: bool,
    },
    ClientDisconnected {
        session_id: u64,
        user: String,
        vpn_address: String,
        reason: EndReason,
        duration_secs: u64,
        bytes_in: u64,
        bytes_out: u64,
    },
    AuthenticationFailed {
        user: String,
        source_address: String,
        reason: String,
    },
    LoginRefused {
        user: String,
        source_address: String,
        reason: String,
    },
    /// No authentication server could check a login: each server and why
    /// (`198.18.2.2:1812: no answer to 2 tries of 3s each; ...`).
    AuthenticationUnavailable {
        user: String,
        source_address: String,
        servers: String,
    },
    /// Failed logins reached a limit (`[limits]`): the source, or the user
    /// from unfamiliar addresses, may not try again until the window ends.
    LoginLockout {
        scope: LockoutScope,
        /// The source address (IPv4, or IPv6 /64) or the user name.
        target: String,
        failures: u32,
        window_secs: u64,
    },
    TunnelDown {
        session_id: u64,
        user: String,
        reason: DownReason,
    },
    ConfigReloaded {
        policies: usize,
        /// Changed sections that only apply after a restart.
        needs_restart: Vec<String>,
    },
    ConfigReloadFailed {
        reason: String,
    },
    /// Client traffic now leaves through another uplink.
    UplinkFailover {
        from: Option<String>,
        to: String,
        reason: String,
    },
    /// An uplink's health changed.
    UplinkState {
        uplink: String,
        state: String,
        reason: String,
    },
    /// A source may open no new connections (`auth/bans.rs`): its score
    /// reached `ban.max_score`, or an admin banned it.
    SourceBanned {
        /// The prefix: an IPv4 /32 or IPv6 /64 by points, any by vpnctl.
        source: String,
        /// "score 100 of 100: wrong-password x12, ..." or "vpnctl".
        reason: String,
        /// How long; absent = until lifted.
        #[serde(skip_serializing_if = "Option::is_none")]
        secs: Option<u64>,
    },
    /// Saved sessions put back at start (`session.persist`), and why
    /// each other was left out.
    SessionsRestored {
        restored: usize,
        left_out: Vec<String>,
    },
    /// A web proxy's health changed ("up" or "down"): the policies that
    /// redirect to it send web traffic to it, or not.
    WebProxyState {
        proxy: String,
        state: String,
        reason: String,
    },
    /// A ban ended: "expired" or "vpnctl".
    BanLifted {
        source: String,
        reason: String,
    },
    /// Who holds a VPN address changed: the identity feed's change
    /// number `seq` (`add`: a session got its addresses; `update`: its
    /// policy changed; `remove`: they are free).
    IdentityChanged {
        seq: u64,
        op: &'static str,
        session_id: u64,
        user: String,
        group: String,
        /// Directory groups (LDAP).
        groups: Vec<String>,
        policy: Option<String>,
        vpn_address: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        vpn_address6: Option<String>,
    },
}

/// What a [`Event::LoginLockout`] locks.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LockoutScope {
    Source,
    User,
}

/// Why a session ended: one name per reason, in the event log
/// (`client_disconnected`) and to the client (CSTP TERMINATE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client logged out (CSTP DISCONNECT 0xb0, or the XML logout).
    UserLogout,
    /// `vpnctl disconnect`.
    Administrator,
    SessionTimeout,
    IdleTimeout,
    /// No tunnel for `disconnected_timeout_secs`.
    DisconnectedTimeout,
    GatewayShutdown,
    UserRemoved,
    PasswordChanged,
    /// The user logged in again at their session limit.
    ReplacedByNewerLogin,
    /// The session's policy no longer exists (fail closed).
    PolicyGone(String),
    /// A RADIUS Disconnect-Request named it (RFC 5176).
    RadiusDisconnect,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::UserLogout => f.write_str("user logout"),
            EndReason::Administrator => f.write_str("disconnected by administrator"),
            EndReason::SessionTimeout => f.write_str("session timeout"),
            EndReason::IdleTimeout => f.write_str("idle timeout"),
            EndReason::DisconnectedTimeout => f.write_str("disconnected timeout"),
            EndReason::GatewayShutdown => f.write_str("gateway shutting down"),
            EndReason::UserRemoved => f.write_str("user removed from the user database"),
            EndReason::PasswordChanged => f.write_str("password changed"),
            EndReason::ReplacedByNewerLogin => {
                f.write_str("replaced by a newer login of the same user")
            }
            EndReason::PolicyGone(p) => write!(f, "group policy '{p}' does not exist any more"),
            EndReason::RadiusDisconnect => {
                f.write_str("disconnected by the RADIUS server (Disconnect-Request)")
            }
        }
    }
}

impl serde::Serialize for EndReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a tunnel went down while its session stays resumable with the
/// cookie (`tunnel_down`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    ClosedByClient,
    ReadError(String),
    WriteError(String),
    /// A write waited this long: the client stopped reading.
    StoppedReading {
        waited_secs: u64,
    },
    /// Silent for three DPD intervals.
    DeadPeer,
    /// A DISCONNECT without logout (Cisco clients, on a network change).
    TemporaryDisconnect,
    ClientTerminate,
    CompressedFrame,
    /// A frame that is not CSTP.
    BadFrame(String),
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownReason::ClosedByClient => f.write_str("connection closed by client"),
            DownReason::ReadError(e) => write!(f, "read error: {e}"),
            DownReason::WriteError(e) => write!(f, "write error: {e}"),
            DownReason::StoppedReading { waited_secs } => {
                write!(f, "client stopped reading (a write waited {waited_secs} s)")
            }
            DownReason::DeadPeer => f.write_str("dead peer detected (no DPD answer)"),
            DownReason::TemporaryDisconnect => f.write_str("client disconnected temporarily"),
            DownReason::ClientTerminate => f.write_str("client sent terminate"),
            DownReason::CompressedFrame => f.write_str("compressed frame without negotiation"),
            DownReason::BadFrame(e) => f.write_str(e),
        }
    }
}

impl serde::Serialize for DownReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a Event,
}

/// Where events go.
pub struct EventLog {
    file: Option<Mutex<File>>,
}

impl EventLog {
    /// Opens (appends to) `path`, creating its directory.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            None => None,
            Some(p) => {
                if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(d)?;
                }
                // Readable too: `vpnctl events` reads it through this
                // descriptor, as vpnd serves as a user that may not open it.
                Some(Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .read(true)
                        .append(true)
                        .open(p)?,
                ))
            }
        };
        Ok(EventLog { file })
    }

    pub fn emit(&self, event: Event) {
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event: &event,
        };
        let json = serde_json::to_string(&line).expect("events serialise");
        tracing::info!(target: "vpnd::event", "{json}");
        if let Some(f) = &self.file {
            // One write per line: the broker appends to the same file.
            let line = json + "\n";
            if let Err(e) = f.lock().write_all(line.as_bytes()) {
                tracing::error!("cannot write event log: {e}");
            }
        }
    }

    /// Up to `max` bytes of the log from where `start` says, given the
    /// log's length (or `None` without a log file), and where they start.
    pub fn read(
        &self,
        start: impl FnOnce(u64) -> u64,
        max: u64,
    ) -> Option<std::io::Result<(u64, String)>> {
        use std::os::unix::fs::FileExt as _;
        let f = self.file.as_ref()?.lock();
        Some((|| {
            let len = f.metadata()?.len();
            let start = start(len);
            let want = len.saturating_sub(start).min(max) as usize;
            let mut buf = vec![0u8; want];
            let mut got = 0;
            while got < want {
                match f.read_at(&mut buf[got..], start + got as u64)? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            Ok((start, String::from_utf8_lossy(&buf).into_owned()))
        })())
    }
}
