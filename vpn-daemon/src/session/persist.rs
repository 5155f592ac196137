//! `session.persist`: sessions survive a restart of vpnd.
//!
//! The session table is saved to `STATE_DIR/sessions.json` (mode 0600)
//! shortly after every change (a login, an end, a policy change: at most
//! [`COALESCE`] later) and every [`REFRESH`] while sessions exist (for
//! their counters), by writing a new file and renaming it over the old, so
//! a crash leaves the last whole file. A clean stop saves once more and
//! closes the tunnels without ending their sessions (no TERMINATE, no
//! accounting Stop); clients reconnect with their cookies, as they do
//! after a network outage (openconnect for `--reconnect-timeout`, 300 s
//! by default), and find their session where they left it: the same
//! addresses, policy, timers and counters, the same RADIUS Acct-Session-Id.
//!
//! Cookies are saved as their SHA-256 hashes, as the table holds them: the
//! file lets no one in. A session is not restored when its time is up,
//! its policy is gone, its addresses are no longer in the pool, or (a
//! local user's) the user was removed or their password changed while
//! vpnd was down; each one left out is logged with why. A file that does not read is kept
//! aside (`sessions.json.bad`) and vpnd starts without saved sessions.
//!
//! After a crash, what changed in the last [`COALESCE`] is lost: a login
//! then is not restored (its client logs in again), an end is undone (the
//! session comes back without a tunnel and ends at
//! `disconnected_timeout_secs` unless its cookie returns).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// How long after a change the file is written (changes meanwhile share
/// the write).
pub const COALESCE: Duration = Duration::from_millis(100);
/// How often the file is written while sessions exist, for the counters.
pub const REFRESH: Duration = Duration::from_secs(30);

/// The file in `server.state_dir`.
pub const FILE: &str = "sessions.json";

const VERSION: u32 = 1;

/// The saved table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub sessions: Vec<SavedSession>,
}

/// One saved session: what a login granted, and where it stood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedSession {
    pub id: u64,
    pub user: String,
    pub group: String,
    /// The user's own policy; the default applies without one.
    pub own_policy: Option<String>,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    pub login_from: IpAddr,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub session_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    /// RADIUS Class values, hex.
    pub class: Vec<String>,
    /// Directory groups (LDAP).
    #[serde(default)]
    pub groups: Vec<String>,
    pub auth_source: crate::auth::AuthSource,
    /// SHA-256 of its cookie, hex.
    pub cookie_sha256: String,
    /// A local user's password fingerprint (`UserDb::credential_tag`): a
    /// password changed while vpnd was down ends the session, as it
    /// would have while up.
    #[serde(default)]
    pub credential: Option<String>,
    /// Its traffic counters when saved.
    pub counters: vpn_common::SessionStats,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The file's path in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Writes `saved` to `path` whole or not at all: a new file (0600),
/// synced, renamed over the old one.
pub fn write(path: &Path, saved: &Saved) -> anyhow::Result<()> {
    let text = serde_json::to_vec(saved)?;
    crate::files::write_private(path, &text).with_context(|| format!("writing {}", path.display()))
}

/// Reads the saved table: None without a file. A file that does not read
/// is renamed to `sessions.json.bad` and reported as the error.
pub fn read(path: &Path) -> anyhow::Result<Option<Saved>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let parsed = serde_json::from_slice::<Saved>(&text)
        .map_err(anyhow::Error::from)
        .and_then(|s| {
            if s.version == VERSION {
                Ok(s)
            } else {
                Err(anyhow::anyhow!(
                    "version {} (this vpnd reads version {VERSION})",
                    s.version
                ))
            }
        });
    match parsed {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            let bad = path.with_extension("json.bad");
            let _ = std::fs::rename(path, &bad);
            Err(e.context(format!(
                "{} does not read; it is kept as {}",
                path.display(),
                bad.display()
            )))
        }
    }
}

impl Saved {
    pub fn new(sessions: Vec<SavedSession>) -> Self {
        Saved {
            version: VERSION,
            sessions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> SavedSession {
        SavedSession {
            id: 7,
            user: "alice".into(),
            group: "default".into(),
            own_policy: Some("staff".into()),
            v4: "198.19.0.9".parse().unwrap(),
            v6: Some("fd00:1::9".parse().unwrap()),
            login_from: "198.18.1.2".parse().unwrap(),
            created_ms: 1_700_000_000_000,
            session_timeout_secs: Some(3600),
            idle_timeout_secs: None,
            class: vec!["0a0b".into()],
            groups: vec!["vpn-eng".into()],
            auth_source: crate::auth::AuthSource::Radius,
            cookie_sha256: "00".repeat(32),
            credential: None,
            counters: vpn_common::SessionStats {
                rx_bytes: 5,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_saved_table_reads_back_and_a_bad_file_is_kept_aside() {
        let dir = std::env::temp_dir().join(format!("vpn-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = path(&dir);
        assert_eq!(read(&p).unwrap(), None, "no file");
        let saved = Saved::new(vec![one()]);
        write(&p, &saved).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read(&p).unwrap(), Some(saved));
        std::fs::write(&p, b"{\"version\": 1, \"sessions\": [{\"id\": ").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(
            e.contains("does not read; it is kept as") && e.contains("sessions.json.bad"),
            "{e}"
        );
        assert!(!p.exists() && dir.join("sessions.json.bad").exists());
        std::fs::write(&p, b"{\"version\": 9, \"sessions\": []}").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("version 9 (this vpnd reads version 1)"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
