//! The LDAP / Active Directory client: finds the user's DN (a template,
//! or a search), binds as the user with their password over TLS, reads
//! their groups (an attribute such as `memberOf`, or a group search, which
//! on AD can follow nested groups), and maps the first mapped group to a
//! group policy ([`Verdict`]). Servers are tried in order; one that
//! cannot be reached, times out or is busy sends us to the next.
//!
//! An empty password never reaches the directory: a simple bind with a
//! DN and no password is an unauthenticated bind, which LDAP servers
//! answer with success (RFC 4513 §5.1.2).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry};

use crate::{
    auth::{Grant, login::Verdict},
    config::{GroupLookup, GroupMapConfig, LdapSettings, Unmapped, UserLookup},
};

/// LDAP result code invalidCredentials (RFC 4511 §4.1.9).
const INVALID_CREDENTIALS: u32 = 49;

/// The message a user in no mapped group gets with `unmapped = "refuse"`.
pub const NOT_IN_A_GROUP: &str = "your account is not in a group allowed to use this VPN";

/// Why one server gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect: {0}")]
    Connect(LdapError),
    #[error("the service account's bind failed: {0}")]
    ServiceBind(LdapError),
    #[error("{0}")]
    Ldap(LdapError),
}

/// No server could answer.
pub type Unavailable = crate::auth::Unavailable<ServerError>;

/// The client of `[ldap]`.
pub struct LdapClient {
    settings: LdapSettings,
    tls: Arc<rustls::ClientConfig>,
    /// The server that answered last: asked first next time.
    preferred: AtomicUsize,
}

impl LdapClient {
    /// A client for `settings`, trusting the certificates of `ca_file`.
    pub fn new(settings: LdapSettings) -> anyhow::Result<Self> {
        let pem = crate::files::read(&settings.ca_file)
            .with_context(|| format!("ldap.ca_file {}", settings.ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots
                .add(cert.context("ldap.ca_file: a certificate that does not parse")?)
                .context("ldap.ca_file: a certificate rustls does not take")?;
        }
        if roots.is_empty() {
            anyhow::bail!(
                "ldap.ca_file {} holds no certificate",
                settings.ca_file.display()
            );
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS versions for LDAP")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(LdapClient {
            settings,
            tls: Arc::new(tls),
            preferred: AtomicUsize::new(0),
        })
    }

    /// Checks `password` for `user`; the verdict of the first server that
    /// answers, else each one's failure.
    pub async fn access(&self, user: &str, password: &str) -> Result<Verdict, Unavailable> {
        if password.is_empty() {
            return Ok(Verdict::WrongPassword);
        }
        let n = self.settings.servers.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let (url, starttls) = &self.settings.servers[idx];
            match self.ask(url, *starttls, user, password).await {
                Ok(v) => {
                    if idx != first {
                        tracing::warn!(
                            "LDAP: now asking {url} first (the servers before it failed)"
                        );
                    }
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    tracing::warn!("LDAP server {url} failed: {e}");
                    failures.push((url.clone(), e));
                }
            }
        }
        Err(Unavailable {
            service: "LDAP",
            failures,
        })
    }

    /// One server's verdict.
    async fn ask(
        &self,
        url: &str,
        starttls: bool,
        user: &str,
        password: &str,
    ) -> Result<Verdict, ServerError> {
        let t = self.settings.timeout;
        let conn = LdapConnSettings::new()
            .set_conn_timeout(t)
            .set_starttls(starttls)
            .set_config(self.tls.clone());
        let (conn, mut ldap) = LdapConnAsync::with_settings(conn, url)
            .await
            .map_err(ServerError::Connect)?;
        ldap3::drive!(conn);
        let verdict = self.check(&mut ldap, user, password, t).await;
        let _ = ldap.unbind().await;
        verdict
    }

    async fn check(
        &self,
        ldap: &mut Ldap,
        user: &str,
        password: &str,
        t: Duration,
    ) -> Result<Verdict, ServerError> {
        let dn = match &self.settings.user {
            UserLookup::Template(template) => template.replace("{user}", &ldap3::dn_escape(user)),
            UserLookup::Search {
                base,
                filter,
                service,
            } => {
                if let Some((dn, pw)) = service {
                    ldap.with_timeout(t)
                        .simple_bind(dn, pw)
                        .await
                        .and_then(|r| r.success())
                        .map_err(ServerError::ServiceBind)?;
                }
                let filter = filter.replace("{user}", &ldap3::ldap_escape(user));
                let (found, _) = ldap
                    .with_timeout(t)
                    .search(base, Scope::Subtree, &filter, vec!["1.1"])
                    .await
                    .and_then(|r| r.success())
                    .map_err(ServerError::Ldap)?;
                match found.as_slice() {
                    [] => return Ok(Verdict::UnknownUser),
                    [one] => SearchEntry::construct(one.clone()).dn,
                    more => {
                        tracing::warn!(
                            "LDAP: {} entries match {filter} under {base}; refusing the login",
                            more.len()
                        );
                        return Ok(Verdict::Rejected { message: None });
                    }
                }
            }
        };
        match ldap
            .with_timeout(t)
            .simple_bind(&dn, password)
            .await
            .and_then(|r| r.success())
        {
            Ok(_) => {}
            Err(LdapError::LdapResult { result }) if result.rc == INVALID_CREDENTIALS => {
                return Ok(Verdict::WrongPassword);
            }
            Err(e) => return Err(ServerError::Ldap(e)),
        }
        let groups = self.groups(ldap, &dn, t).await?;
        Ok(
            match map_groups(&self.settings.group_map, &groups, self.settings.unmapped) {
                Some(own_policy) => Verdict::Accept(Grant {
                    source: crate::auth::AuthSource::Ldap,
                    own_policy,
                    groups: groups
                        .iter()
                        .take(MAX_FEED_GROUPS)
                        .map(|g| crate::proto::client_string(first_rdn_value(g)))
                        .collect(),
                    ..Grant::default()
                }),
                None => Verdict::Rejected {
                    message: Some(NOT_IN_A_GROUP.into()),
                },
            },
        )
    }

    /// The DNs of the groups `dn` is in, read as the user.
    async fn groups(
        &self,
        ldap: &mut Ldap,
        dn: &str,
        t: Duration,
    ) -> Result<Vec<String>, ServerError> {
        match &self.settings.groups {
            GroupLookup::None => Ok(Vec::new()),
            GroupLookup::Attribute(a) => {
                let (found, _) = ldap
                    .with_timeout(t)
                    .search(dn, Scope::Base, "(objectClass=*)", vec![a.as_str()])
                    .await
                    .and_then(|r| r.success())
                    .map_err(ServerError::Ldap)?;
                Ok(found
                    .into_iter()
                    .map(SearchEntry::construct)
                    .flat_map(|e| {
                        e.attrs
                            .into_iter()
                            .filter(|(k, _)| k.eq_ignore_ascii_case(a))
                            .flat_map(|(_, v)| v)
                    })
                    .collect())
            }
            GroupLookup::Search {
                base,
                filter,
                nested,
            } => {
                let mut all: Vec<String> = Vec::new();
                let mut frontier = vec![dn.to_owned()];
                for _ in 0..if *nested { MAX_NESTING } else { 1 } {
                    let mut next = Vec::new();
                    for member in &frontier {
                        let f = filter.replace("{dn}", &ldap3::ldap_escape(member));
                        let (found, _) = ldap
                            .with_timeout(t)
                            .search(base, Scope::Subtree, &f, vec!["1.1"])
                            .await
                            .and_then(|r| r.success())
                            .map_err(ServerError::Ldap)?;
                        for g in found.into_iter().map(|e| SearchEntry::construct(e).dn) {
                            let n = normalize_dn(&g);
                            if !all.iter().any(|a| normalize_dn(a) == n) && all.len() < MAX_GROUPS {
                                all.push(g.clone());
                                next.push(g);
                            }
                        }
                    }
                    if next.is_empty() {
                        break;
                    }
                    frontier = next;
                }
                Ok(all)
            }
        }
    }
}

/// How deep `nested_groups` follows groups in groups, and how many
/// groups it collects at most (a cycle or a huge tree ends there).
const MAX_NESTING: usize = 8;
const MAX_GROUPS: usize = 256;

/// A DN in a form two spellings of one DN share: lower case, no spaces
/// around the separators.
fn normalize_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| rdn.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

/// Directory groups a session carries at most (the identity feed's).
const MAX_FEED_GROUPS: usize = 32;

/// The value of a DN's first RDN (`cn=vpn-eng,ou=groups,...` → `vpn-eng`).
fn first_rdn_value(dn: &str) -> &str {
    dn.split(',')
        .next()
        .and_then(|rdn| rdn.split_once('='))
        .map_or(dn, |(_, v)| v.trim())
}

/// The policy the first row of `map` the user's `groups` match gives:
/// `Some(Some(policy))`; `Some(None)` = the default policy (no row
/// matched, `unmapped = "default"`); `None` = refuse.
pub fn map_groups(
    map: &[GroupMapConfig],
    groups: &[String],
    unmapped: Unmapped,
) -> Option<Option<String>> {
    let hit = map.iter().find(|m| {
        groups.iter().any(|g| {
            if m.group.contains('=') {
                normalize_dn(&m.group) == normalize_dn(g)
            } else {
                m.group.eq_ignore_ascii_case(first_rdn_value(g))
            }
        })
    });
    match (hit, unmapped) {
        (Some(m), _) => Some(Some(m.policy.clone())),
        (None, Unmapped::Default) => Some(None),
        (None, Unmapped::Refuse) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(group: &str, policy: &str) -> GroupMapConfig {
        GroupMapConfig {
            group: group.into(),
            policy: policy.into(),
        }
    }

    #[test]
    fn the_first_mapped_group_wins_by_dn_or_name() {
        let map = [
            row("CN=VPN-Admins, OU=Groups, DC=corp, DC=example", "admins"),
            row("vpn-eng", "engineering"),
            row("vpn-all", "staff"),
        ];
        let groups = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Order of the map decides, not the order of the user's groups.
        assert_eq!(
            map_groups(
                &map,
                &groups(&[
                    "cn=vpn-all,ou=groups,dc=corp,dc=example",
                    "cn=vpn-eng,ou=groups,dc=corp,dc=example"
                ]),
                Unmapped::Refuse
            ),
            Some(Some("engineering".into()))
        );
        // A DN row matches other spellings of the DN.
        assert_eq!(
            map_groups(
                &map,
                &groups(&["cn=vpn-admins,ou=groups,dc=corp,dc=example"]),
                Unmapped::Refuse
            ),
            Some(Some("admins".into()))
        );
        // ... but not another group with the same name elsewhere.
        assert_eq!(
            map_groups(
                &map,
                &groups(&["cn=vpn-admins,ou=other,dc=corp,dc=example"]),
                Unmapped::Refuse
            ),
            None
        );
        assert_eq!(map_groups(&map, &[], Unmapped::Default), Some(None));
        assert_eq!(map_groups(&map, &[], Unmapped::Refuse), None);
    }

    #[tokio::test]
    async fn an_empty_password_never_reaches_the_directory() {
        let dir = std::env::temp_dir().join(format!("ldap-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ldap.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let c = LdapClient::new(LdapSettings {
            // A server that would answer "refused" or time out: never asked.
            servers: vec![("ldaps://198.18.0.1:1".into(), false)],
            ca_file: ca,
            timeout: Duration::from_secs(5),
            user: UserLookup::Template("uid={user},dc=test".into()),
            groups: GroupLookup::None,
            group_map: Vec::new(),
            unmapped: Unmapped::Default,
        })
        .unwrap();
        assert_eq!(c.access("dave", "").await.unwrap(), Verdict::WrongPassword);
        let _ = std::fs::remove_dir_all(dir);
    }
}
