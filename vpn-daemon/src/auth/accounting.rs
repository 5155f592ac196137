//! RADIUS accounting (RFC 2866): a Start when a RADIUS-authenticated
//! session begins, Interim-Updates while it lasts, a Stop when it ends,
//! each with the user, the VPN and public addresses and the session's
//! counters. Firewalls and proxies learn from it who holds which VPN
//! address.
//!
//! Records go through a bounded queue to one task that sends them in
//! order, to the servers in order (the next when one does not answer),
//! so a slow server never holds up a login or a session's end. A full
//! queue drops the record and counts it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;

use crate::{
    auth::radius::{Exchange, ServerError},
    config::RadiusSettings,
    events::EndReason,
    proto::radius::{self, Code, attr},
};

/// Records waiting to be sent, at most.
const QUEUE: usize = 4096;

/// Acct-Status-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Start = 1,
    Stop = 2,
    InterimUpdate = 3,
}

/// A session's counters, as the NAS sees them: input is what the client
/// sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub input_octets: u64,
    pub output_octets: u64,
    pub input_packets: u64,
    pub output_packets: u64,
}

/// One accounting record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub status: Status,
    /// Acct-Session-Id: unique across restarts ([`session_id`]).
    pub session_id: String,
    pub user: String,
    pub framed_v4: Ipv4Addr,
    pub framed_v6: Option<Ipv6Addr>,
    /// The client's public address (Calling-Station-Id).
    pub client: IpAddr,
    /// The Access-Accept's Class values, echoed.
    pub class: Vec<Vec<u8>>,
    pub session_time: Duration,
    pub counters: Counters,
    /// Why it ended (Stop only).
    pub cause: Option<EndReason>,
}

/// Acct-Session-Id for session `id` created at `created`: the creation
/// time and the id, so ids of a restarted daemon do not repeat.
pub fn session_id(id: u64, created: SystemTime) -> String {
    let secs = created
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{secs:08X}-{id:08X}")
}

/// Acct-Terminate-Cause (RFC 2866 §5.10) for why a session ended.
pub fn terminate_cause(r: &EndReason) -> u32 {
    match r {
        EndReason::UserLogout => 1,           // User Request
        EndReason::DisconnectedTimeout => 2,  // Lost Carrier
        EndReason::IdleTimeout => 4,          // Idle Timeout
        EndReason::SessionTimeout => 5,       // Session Timeout
        EndReason::Administrator => 6,        // Admin Reset
        EndReason::GatewayShutdown => 11,     // NAS Reboot
        EndReason::UserRemoved => 6,          // Admin Reset
        EndReason::PasswordChanged => 6,      // Admin Reset
        EndReason::ReplacedByNewerLogin => 8, // Port Preempted
        EndReason::PolicyGone(_) => 10,       // NAS Request
        EndReason::RadiusDisconnect => 6,     // Admin Reset
    }
}

/// The attributes of `r` (without the NAS's own).
fn attributes(r: &Record) -> Vec<(u8, Vec<u8>)> {
    let be = |v: u32| v.to_be_bytes().to_vec();
    let lo = |v: u64| be(v as u32);
    let hi = |v: u64| be((v >> 32) as u32);
    let mut a = vec![
        (attr::ACCT_STATUS_TYPE, be(r.status as u32)),
        (attr::ACCT_SESSION_ID, r.session_id.as_bytes().to_vec()),
        (attr::USER_NAME, r.user.as_bytes().to_vec()),
        (attr::FRAMED_IP_ADDRESS, r.framed_v4.octets().to_vec()),
        (attr::CALLING_STATION_ID, r.client.to_string().into_bytes()),
        (attr::ACCT_AUTHENTIC, be(1)), // RADIUS
    ];
    if let Some(v6) = r.framed_v6 {
        a.push((attr::FRAMED_IPV6_ADDRESS, v6.octets().to_vec()));
    }
    a.extend(r.class.iter().map(|c| (attr::CLASS, c.clone())));
    if r.status != Status::Start {
        let c = &r.counters;
        a.extend([
            (attr::ACCT_SESSION_TIME, be(r.session_time.as_secs() as u32)),
            (attr::ACCT_INPUT_OCTETS, lo(c.input_octets)),
            (attr::ACCT_INPUT_GIGAWORDS, hi(c.input_octets)),
            (attr::ACCT_OUTPUT_OCTETS, lo(c.output_octets)),
            (attr::ACCT_OUTPUT_GIGAWORDS, hi(c.output_octets)),
            (attr::ACCT_INPUT_PACKETS, lo(c.input_packets)),
            (attr::ACCT_OUTPUT_PACKETS, lo(c.output_packets)),
        ]);
    }
    if let Some(cause) = &r.cause {
        a.push((attr::ACCT_TERMINATE_CAUSE, be(terminate_cause(cause))));
    }
    a
}

/// What the accounting task has done (`vpnctl stats`).
#[derive(Debug, Default)]
pub struct AccountingCounters {
    pub sent: AtomicU64,
    /// No server took it.
    pub failed: AtomicU64,
    /// The queue was full.
    pub dropped: AtomicU64,
    /// Queued and not yet answered or failed.
    pub pending: AtomicU64,
}

/// The accounting sender: records in, one task sending them.
pub struct Accounting {
    tx: mpsc::Sender<Record>,
    pub counters: Arc<AccountingCounters>,
}

impl Accounting {
    /// Starts the sender for `settings`' servers that take accounting.
    pub fn start(settings: &RadiusSettings) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(AccountingCounters::default());
        tokio::spawn(run(settings.clone(), rx, counters.clone()));
        Arc::new(Accounting { tx, counters })
    }

    /// Queues `r`.
    pub fn record(&self, r: Record) {
        self.counters.pending.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(r).is_err() {
            self.counters.pending.fetch_sub(1, Ordering::Relaxed);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("RADIUS accounting queue full: a record was dropped");
        }
    }

    /// Waits up to `limit` for the queued records to be sent (at
    /// shutdown: the Stops).
    pub async fn flush(&self, limit: Duration) {
        let end = tokio::time::Instant::now() + limit;
        while self.counters.pending.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn run(
    settings: RadiusSettings,
    mut rx: mpsc::Receiver<Record>,
    counters: Arc<AccountingCounters>,
) {
    let servers: Vec<_> = settings
        .servers
        .iter()
        .filter_map(|s| s.accounting.map(|a| (a, s)))
        .collect();
    let mut preferred = 0;
    while let Some(r) = rx.recv().await {
        let mut attrs = attributes(&r);
        attrs.extend([
            (
                attr::NAS_IDENTIFIER,
                settings.nas_identifier.as_bytes().to_vec(),
            ),
            (
                attr::NAS_PORT_TYPE,
                radius::NAS_PORT_TYPE_VIRTUAL.to_be_bytes().to_vec(),
            ),
            (
                attr::SERVICE_TYPE,
                radius::SERVICE_TYPE_FRAMED.to_be_bytes().to_vec(),
            ),
            (
                attr::EVENT_TIMESTAMP,
                (SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs() as u32)
                    .to_be_bytes()
                    .to_vec(),
            ),
        ]);
        let attrs: Vec<(u8, &[u8])> = attrs.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        let mut failures: Vec<(std::net::SocketAddr, ServerError)> = Vec::new();
        let mut done = false;
        for i in 0..servers.len() {
            let idx = (preferred + i) % servers.len();
            let (to, server) = servers[idx];
            let id = rand::random::<u8>();
            let sent = match radius::accounting_request(id, server.secret.as_bytes(), &attrs) {
                Ok((packet, auth)) => {
                    let ex = Exchange {
                        to,
                        secret: server.secret.as_bytes(),
                        require_message_authenticator: false,
                        tries: settings.tries,
                        timeout: settings.timeout,
                    };
                    ex.run(&packet, id, &auth).await.and_then(|p| match p.code {
                        Code::AccountingResponse => Ok(()),
                        other => Err(ServerError::UnexpectedCode(other)),
                    })
                }
                Err(e) => Err(ServerError::Encode(e)),
            };
            match sent {
                Ok(()) => {
                    preferred = idx;
                    done = true;
                    break;
                }
                Err(e) => failures.push((to, e)),
            }
        }
        if done {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            let why: Vec<String> = failures.iter().map(|(a, e)| format!("{a}: {e}")).collect();
            tracing::error!(
                "RADIUS accounting {:?} for session {} of {} not taken by any server: {}",
                r.status,
                r.session_id,
                r.user,
                why.join("; ")
            );
        }
        counters.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_records_carry_counters_gigawords_class_and_cause() {
        let r = Record {
            status: Status::Stop,
            session_id: session_id(7, SystemTime::UNIX_EPOCH + Duration::from_secs(0x1234)),
            user: "alice".into(),
            framed_v4: Ipv4Addr::new(198, 19, 0, 77),
            framed_v6: None,
            client: "198.18.1.2".parse().unwrap(),
            class: vec![b"c1".to_vec()],
            session_time: Duration::from_secs(90),
            counters: Counters {
                input_octets: (5 << 32) + 10,
                output_octets: 20,
                input_packets: 3,
                output_packets: 4,
            },
            cause: Some(EndReason::IdleTimeout),
        };
        assert_eq!(r.session_id, "00001234-00000007");
        let a = attributes(&r);
        let get = |t| a.iter().find(|(x, _)| *x == t).map(|(_, v)| v.clone());
        let num = |t| u32::from_be_bytes(get(t).unwrap().try_into().unwrap());
        assert_eq!(num(attr::ACCT_STATUS_TYPE), 2);
        assert_eq!(num(attr::ACCT_INPUT_OCTETS), 10);
        assert_eq!(num(attr::ACCT_INPUT_GIGAWORDS), 5);
        assert_eq!(num(attr::ACCT_OUTPUT_OCTETS), 20);
        assert_eq!(num(attr::ACCT_SESSION_TIME), 90);
        assert_eq!(num(attr::ACCT_TERMINATE_CAUSE), 4);
        assert_eq!(get(attr::CLASS).unwrap(), b"c1");
        assert_eq!(get(attr::FRAMED_IP_ADDRESS).unwrap(), [198, 19, 0, 77]);
        assert_eq!(get(attr::CALLING_STATION_ID).unwrap(), b"198.18.1.2");
        // A Start has no counters.
        let start = attributes(&Record {
            status: Status::Start,
            cause: None,
            ..r
        });
        assert!(!start.iter().any(|(t, _)| *t == attr::ACCT_INPUT_OCTETS));
    }
}
