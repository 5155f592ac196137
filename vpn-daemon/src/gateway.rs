//! The gateway: the services, wired together once at start-up
//! ([`crate::run`]), and what spans them (reload, the admission figures).
//! It holds no protocol logic of its own.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
};

use crate::{
    auth::{
        admission::{self, Connections},
        users::UserDb,
    },
    config::{Config, ConfigError, Settings},
    datapath::tun::Tun,
    events::{Event, EventLog},
    login::LoginService,
    policies::PolicyError,
    session::manager::SessionManager,
    transport::{dtls::DtlsServer, listener::Listener, tls_tunnel::TunnelService},
};

/// Why a reload was rejected; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not read or validate.
    #[error("reload rejected, the running configuration stays: {0}")]
    Config(ConfigError),
    /// The new policies could not be installed, or sessions not moved to
    /// them (everything was rolled back).
    #[error("reload rejected, the running configuration stays: {0}")]
    Policies(PolicyError),
    /// `tls.client_crl_file` does not read or parse.
    #[error("reload rejected, the running configuration stays: {0}")]
    Crl(String),
    /// The new authentication backends cannot be built (`ldap.ca_file`).
    #[error("reload rejected, the running configuration stays: {0}")]
    Backends(String),
}

impl ReloadError {
    /// What went wrong, for the event log.
    fn cause(&self) -> String {
        match self {
            ReloadError::Config(e) => e.to_string(),
            ReloadError::Policies(e) => e.to_string(),
            ReloadError::Crl(e) | ReloadError::Backends(e) => e.clone(),
        }
    }
}

/// The services of a running gateway.
pub struct Gateway {
    pub settings: Settings,
    /// The file `reload` re-reads.
    pub config_path: PathBuf,
    pub users: Arc<UserDb>,
    pub events: Arc<EventLog>,
    pub tun: Arc<Tun>,
    /// The kernel offloads the data path uses (`datapath/offloads.rs`).
    pub offloads: crate::datapath::offloads::Offloads,
    /// Sessions and what they hold (pool, data-path entries, policies).
    pub sessions: Arc<SessionManager>,
    pub login: Arc<LoginService>,
    pub tunnels: Arc<TunnelService>,
    pub listener: Arc<Listener>,
    /// Connections that are not tunnels.
    pub connections: Arc<Connections>,
    /// What the limits before authentication refused.
    pub admission: Arc<admission::Counters>,
    /// The DTLS server, when `[dtls] enabled`.
    pub dtls: Option<Arc<DtlsServer>>,
    /// The privileged part: the data path's maps and the uplinks.
    pub broker: Arc<crate::broker::Broker>,
    /// Latency histograms the services fill in (the metrics endpoint).
    pub latencies: Arc<crate::telemetry::Latencies>,
    /// The client certificate verifier, when `tls.client_ca_file` is set
    /// (its CRLs follow reloads).
    pub client_certs: Option<Arc<crate::transport::client_cert::ClientVerifier>>,
    /// Ban points and bans (`[ban]`, `vpnctl ban`).
    pub bans: Arc<crate::auth::bans::Bans>,
}

impl Gateway {
    /// The admission limits' state and counters.
    pub fn admission_stats(&self) -> crate::api::AdmissionStats {
        let l = &self.settings.limits;
        let c = &self.admission;
        let (pending, sources_locked, users_locked, verifications) = self.login.counts();
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        crate::api::AdmissionStats {
            connections: self.connections.open(),
            max_connections: l.max_connections,
            max_connections_per_source: l.max_connections_per_source,
            connections_refused_total: n(&c.connections_refused_total),
            connections_refused_source: n(&c.connections_refused_source),
            connections_closed_requests: n(&c.connections_closed_requests),
            connections_closed_lifetime: n(&c.connections_closed_lifetime),
            pending_logins: pending,
            max_pending_logins: l.max_pending_logins,
            logins_refused_busy: n(&c.logins_refused_busy),
            logins_refused_source_busy: n(&c.logins_refused_source_busy),
            logins_refused_source_locked: n(&c.logins_refused_source_locked),
            logins_refused_user_locked: n(&c.logins_refused_user_locked),
            sources_locked,
            users_locked,
            verifications_refused_busy: n(&c.verifications_refused_busy),
            verifications_in_progress: verifications,
            resident_bytes: self.login.resident_bytes().unwrap_or(0),
            max_memory_bytes: self.login.memory_ceiling.get().unwrap_or(0),
            logins_refused_memory: n(&c.logins_refused_memory),
            connections_refused_descriptors: n(&c.connections_refused_descriptors),
        }
    }

    /// `vpnctl reload` / SIGHUP: re-reads the config file. A file that does
    /// not validate is rejected and the running config stays. Group
    /// policies and the default policy change live; other sections need a
    /// restart and are reported as such.
    pub fn reload(&self) -> Result<String, ReloadError> {
        let fail = |e: ReloadError| {
            self.events
                .emit(Event::ConfigReloadFailed { reason: e.cause() });
            e
        };
        let new = Config::load(&self.config_path).map_err(|e| fail(ReloadError::Config(e)))?;
        // The CRLs are read first: a bad file rejects the whole reload.
        let backends = crate::login::Backends::from_settings(&new)
            .map_err(|e| fail(ReloadError::Backends(format!("{e:#}"))))?;
        let crls = match &self.client_certs {
            Some(v) => Some(
                v.prepare(new.tls.client_crl_file.as_deref())
                    .map_err(|e| fail(ReloadError::Crl(format!("{e:#}"))))?,
            ),
            None => None,
        };
        self.sessions
            .apply_policies(&new)
            .map_err(|e| fail(ReloadError::Policies(e)))?;
        if let (Some(v), Some(crls)) = (&self.client_certs, crls) {
            v.install(crls);
        }
        self.login.set_backends(backends);
        self.login.set_profiles(new.profiles.clone());
        self.login
            .memory_ceiling
            .set(new.limits.max_memory_mib << 20);
        self.bans.set_rules(new.ban.clone());
        let restart = self.settings.needs_restart(&new);
        let n = new.policies.len();
        self.events.emit(Event::ConfigReloaded {
            policies: n,
            needs_restart: restart.iter().map(|s| s.to_string()).collect(),
        });
        Ok(if restart.is_empty() {
            format!("reloaded: {n} group policies applied")
        } else {
            format!(
                "reloaded: {n} group policies applied; changes to [{}] take effect after a restart",
                restart.join("], [")
            )
        })
    }
}
