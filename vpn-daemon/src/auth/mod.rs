//! Who may log in, and how much a stranger may make the gateway do before
//! that: the login flow (`login`), the local user database (`users`), the
//! RADIUS client (`radius`) and its accounting (`accounting`), the LDAP /
//! Active Directory client (`ldap`), the limits before authentication
//! (`admission`), and ban points (`bans`).

use std::{net::Ipv4Addr, time::Duration};

pub mod accounting;
pub mod admission;
pub mod bans;
pub mod ldap;
pub mod login;
pub mod radius;
pub mod users;

/// Who authenticated a session (saved by `session.persist` as "local",
/// "radius", "ldap" or "certificate").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthSource {
    /// The local user database: its later changes (user removed, password
    /// or policy changed) apply to the session.
    #[default]
    Local,
    /// A RADIUS server: the session gets accounting, and Disconnect/CoA.
    Radius,
    Ldap,
    /// A client certificate alone.
    Certificate,
}

/// What a successful login grants beyond the user's name, as the
/// authentication source said it: the session is created with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub source: AuthSource,
    /// The user's own group policy (the local user's `group_policy`,
    /// RADIUS Filter-Id), over the group's default. A name no policy has
    /// refuses the session (fail closed).
    pub own_policy: Option<String>,
    /// The address the server assigned (RADIUS Framed-IP-Address), used
    /// when it is free in the pool.
    pub framed_v4: Option<Ipv4Addr>,
    /// Shorter session and idle timeouts than the configured ones (RADIUS
    /// Session-Timeout, Idle-Timeout).
    pub session_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// RADIUS Class values, echoed in accounting.
    pub class: Vec<Vec<u8>>,
    /// The user's directory groups (LDAP: each group's first RDN value,
    /// `vpn-eng` for `cn=vpn-eng,ou=groups,...`), for the identity feed.
    pub groups: Vec<String>,
}

/// No server of a directory answered a login: each one and why.
#[derive(Debug, thiserror::Error)]
pub struct Unavailable<E: std::error::Error> {
    /// "RADIUS", "LDAP".
    pub service: &'static str,
    /// Each server (address or URL) and its failure, in the order asked.
    pub failures: Vec<(String, E)>,
}

impl<E: std::error::Error> std::fmt::Display for Unavailable<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no {} server answered: ", self.service)?;
        for (i, (server, why)) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{server}: {why}")?;
        }
        Ok(())
    }
}

impl Grant {
    /// A first factor's grant with what the second factor's server said
    /// on top: its policy, address, timeouts and Class where it gave
    /// them. The session stays the first factor's (its source).
    pub fn with_second(self, second: Grant) -> Grant {
        Grant {
            source: self.source,
            own_policy: second.own_policy.or(self.own_policy),
            framed_v4: second.framed_v4.or(self.framed_v4),
            session_timeout: second.session_timeout.or(self.session_timeout),
            idle_timeout: second.idle_timeout.or(self.idle_timeout),
            class: if second.class.is_empty() {
                self.class
            } else {
                second.class
            },
            groups: if second.groups.is_empty() {
                self.groups
            } else {
                second.groups
            },
        }
    }
}
