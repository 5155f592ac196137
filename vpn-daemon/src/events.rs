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
        reason: String,
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
        reason: String,
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
}

/// What a [`Event::LoginLockout`] locks.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LockoutScope {
    Source,
    User,
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
                Some(Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
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
            let mut f = f.lock();
            if let Err(e) = writeln!(f, "{json}") {
                tracing::error!("cannot write event log: {e}");
            }
        }
    }
}
