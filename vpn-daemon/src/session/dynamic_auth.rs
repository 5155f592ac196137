//! RADIUS Dynamic Authorization (RFC 5176) on `radius.dynamic_authorization`:
//! a Disconnect-Request ends the sessions it names, a CoA-Request with a
//! Filter-Id moves them to that group policy at once (the policy machinery
//! flips a session atomically in its BPF entry).
//!
//! Requests are taken only from the configured RADIUS servers' addresses,
//! each checked with that server's secret (authenticator and
//! Message-Authenticator); anything else is dropped without an answer, as
//! RFC 5176 §3.5 says. Replays are dropped too: an Event-Timestamp more
//! than 300 s away from now, and a request whose authenticator was already
//! taken in the last 300 s (the authenticator covers the whole packet, so
//! a captured request sent again has the same one; a server's own
//! retransmission gets no second action either).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::net::UdpSocket;

use crate::{
    config::RadiusSettings,
    events::EndReason,
    proto::radius::{self, Code, Packet, attr, error_cause},
    session::manager::{SessionIdentity, SessionManager},
};

/// How far an Event-Timestamp may be from now (RFC 5176 §3.5 suggests
/// 300 s).
const REPLAY_WINDOW: Duration = Duration::from_secs(300);

/// Attributes a request may carry that are not a change we must make.
const IDENTIFYING: &[u8] = &[
    attr::USER_NAME,
    attr::ACCT_SESSION_ID,
    attr::FRAMED_IP_ADDRESS,
    attr::CALLING_STATION_ID,
    attr::NAS_IDENTIFIER,
    attr::NAS_IP_ADDRESS,
    attr::EVENT_TIMESTAMP,
    attr::MESSAGE_AUTHENTICATOR,
];

/// Binds `settings.dynamic_authorization`, if set, and serves it.
pub async fn start(settings: &RadiusSettings, sessions: Arc<SessionManager>) -> anyhow::Result<()> {
    let Some(addr) = settings.dynamic_authorization else {
        return Ok(());
    };
    let sock = UdpSocket::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("radius.dynamic_authorization: cannot listen on {addr}: {e}")
    })?;
    let clients: Vec<(IpAddr, String)> = settings
        .servers
        .iter()
        .map(|s| (s.address.ip(), s.secret.clone()))
        .collect();
    tracing::info!(%addr, "RADIUS Disconnect and CoA requests taken");
    tokio::spawn(serve(sock, clients, sessions));
    Ok(())
}

/// Request authenticators taken within [`REPLAY_WINDOW`], to drop a
/// request seen before. Bounded: when full, the oldest is forgotten.
#[derive(Default)]
struct Seen {
    at: std::collections::HashMap<[u8; 16], std::time::Instant>,
}

/// Authenticators remembered at most.
const MAX_SEEN: usize = 4096;

impl Seen {
    /// Whether `auth` is new within the window (and remembers it).
    fn first_time(&mut self, auth: [u8; 16], now: std::time::Instant) -> bool {
        self.at
            .retain(|_, t| now.saturating_duration_since(*t) < REPLAY_WINDOW);
        if self.at.contains_key(&auth) {
            return false;
        }
        if self.at.len() >= MAX_SEEN
            && let Some(oldest) = self.at.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k)
        {
            self.at.remove(&oldest);
        }
        self.at.insert(auth, now);
        true
    }
}

async fn serve(sock: UdpSocket, clients: Vec<(IpAddr, String)>, sessions: Arc<SessionManager>) {
    let mut buf = vec![0u8; radius::MAX_PACKET];
    let mut seen = Seen::default();
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("RADIUS dynamic authorization socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(reply) = answer(&buf[..n], from, &clients, &sessions, &mut seen) else {
            continue;
        };
        if let Err(e) = sock.send_to(&reply, from).await {
            tracing::warn!(%from, "RADIUS dynamic authorization answer not sent: {e}");
        }
    }
}

/// The answer to one datagram from `from`, if it gets one.
fn answer(
    buf: &[u8],
    from: SocketAddr,
    clients: &[(IpAddr, String)],
    sessions: &SessionManager,
    seen: &mut Seen,
) -> Option<Vec<u8>> {
    let Some((_, secret)) = clients.iter().find(|(a, _)| *a == from.ip().to_canonical()) else {
        tracing::warn!(%from, "RADIUS dynamic authorization request from an unknown address dropped");
        return None;
    };
    let req = match radius::verify_request(buf, secret.as_bytes()) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%from, "RADIUS dynamic authorization request dropped: {e}");
            return None;
        }
    };
    if let Some(t) = req.u32(attr::EVENT_TIMESTAMP) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(t.into());
        let now = SystemTime::now();
        let off = now
            .duration_since(at)
            .or_else(|_| at.duration_since(now))
            .unwrap_or_default();
        if off > REPLAY_WINDOW {
            tracing::warn!(%from, "RADIUS dynamic authorization request dropped: its Event-Timestamp is {}s away from now (a replay?)", off.as_secs());
            return None;
        }
    }
    if !seen.first_time(req.authenticator, std::time::Instant::now()) {
        tracing::warn!(%from, "RADIUS {} dropped: the same request was taken in the last {} s (a replay, or a retransmission)", req.code, REPLAY_WINDOW.as_secs());
        return None;
    }
    let (ack, nak) = match req.code {
        Code::DisconnectRequest => (Code::DisconnectAck, Code::DisconnectNak),
        Code::CoaRequest => (Code::CoaAck, Code::CoaNak),
        other => {
            tracing::warn!(%from, "RADIUS {other} on the dynamic authorization port dropped");
            return None;
        }
    };
    let outcome = act(&req, sessions);
    let (code, cause) = match outcome {
        Ok(()) => (ack, None),
        Err(cause) => (nak, Some(cause)),
    };
    tracing::info!(%from, "RADIUS {}: {code}{}", req.code, cause.map(|c| format!(" (Error-Cause {c})")).unwrap_or_default());
    let cause_bytes = cause.map(u32::to_be_bytes);
    let attrs: Vec<(u8, &[u8])> = cause_bytes
        .as_ref()
        .map(|c| (attr::ERROR_CAUSE, &c[..]))
        .into_iter()
        .collect();
    radius::response(
        code,
        req.id,
        &req.authenticator,
        secret.as_bytes(),
        &attrs,
        true,
    )
    .ok()
}

/// Carries out a verified request; `Err` is the NAK's Error-Cause.
fn act(req: &Packet, sessions: &SessionManager) -> Result<(), u32> {
    let who = SessionIdentity {
        user: req.text(attr::USER_NAME),
        acct_session_id: req.text(attr::ACCT_SESSION_ID),
        framed_v4: req.ipv4(attr::FRAMED_IP_ADDRESS),
        calling_station: req.text(attr::CALLING_STATION_ID),
    };
    if who.is_empty() {
        return Err(error_cause::MISSING_ATTRIBUTE);
    }
    let matching = sessions.matching(&who);
    if matching.is_empty() {
        return Err(error_cause::SESSION_CONTEXT_NOT_FOUND);
    }
    if req.code == Code::DisconnectRequest {
        for s in matching {
            sessions.end(s.id, EndReason::RadiusDisconnect);
        }
        return Ok(());
    }
    // CoA: a Filter-Id is the one change we make; anything else we
    // cannot do is refused whole (RFC 5176 §3.3).
    if req
        .attrs
        .iter()
        .any(|(t, _)| *t != attr::FILTER_ID && !IDENTIFYING.contains(t))
    {
        return Err(error_cause::UNSUPPORTED_ATTRIBUTE);
    }
    let Some(policy) = req.text(attr::FILTER_ID) else {
        return Err(error_cause::MISSING_ATTRIBUTE);
    };
    for s in matching {
        if let Err(e) = sessions.set_own_policy(&s, &policy) {
            tracing::warn!(parent: &s.span, "CoA to policy '{policy}' refused: {e}");
            return Err(error_cause::INVALID_ATTRIBUTE_VALUE);
        }
        tracing::info!(parent: &s.span, "CoA: policy now '{policy}'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_request_is_taken_once_per_window_and_memory_is_bounded() {
        let mut seen = Seen::default();
        let t = Instant::now();
        assert!(seen.first_time([1; 16], t));
        assert!(
            !seen.first_time([1; 16], t + Duration::from_secs(299)),
            "a replay"
        );
        assert!(seen.first_time([2; 16], t));
        // After the window the authenticator may come again (and the
        // Event-Timestamp check stops old captures).
        assert!(seen.first_time([1; 16], t + REPLAY_WINDOW));
        for i in 0..(MAX_SEEN as u32 + 10) {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&i.to_be_bytes());
            a[15] = 9;
            seen.first_time(a, t + REPLAY_WINDOW);
        }
        assert!(seen.at.len() <= MAX_SEEN);
    }
}
