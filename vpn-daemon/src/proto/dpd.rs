//! Dead-peer detection on the CSTP channel, without I/O: the tunnel tells
//! it when something arrived and asks it, once a second, what to do. A
//! client silent for one DPD interval gets a DPD request (at most one per
//! half interval); silent for three, it is dead (openconnect and ocserv
//! work the same way; the interval is pushed as `X-CSTP-DPD`).

use std::time::{Duration, Instant};

/// What the tunnel does at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpdAction {
    Nothing,
    /// Send a DPD request frame.
    SendRequest,
    /// The peer is dead: end the tunnel (the session stays resumable).
    Dead,
}

/// One tunnel's DPD state.
#[derive(Debug, Clone)]
pub struct Dpd {
    interval: Duration,
    last_rx: Instant,
    last_request: Option<Instant>,
}

impl Dpd {
    /// DPD every `interval`, counting from `now`.
    pub fn new(interval: Duration, now: Instant) -> Self {
        Dpd {
            interval,
            last_rx: now,
            last_request: None,
        }
    }

    /// Something arrived from the client.
    pub fn received(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// What to do at `now`; a [`DpdAction::SendRequest`] counts as sent.
    pub fn tick(&mut self, now: Instant) -> DpdAction {
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= self.interval * 3 {
            return DpdAction::Dead;
        }
        let since_request = self
            .last_request
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if silent >= self.interval && since_request >= self.interval / 2 {
            self.last_request = Some(now);
            return DpdAction::SendRequest;
        }
        DpdAction::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_gets_requests_then_is_dead_after_three_intervals() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut d = Dpd::new(Duration::from_secs(10), t0);
        assert_eq!(d.tick(s(9)), DpdAction::Nothing);
        assert_eq!(d.tick(s(10)), DpdAction::SendRequest);
        assert_eq!(d.tick(s(11)), DpdAction::Nothing, "one per half interval");
        assert_eq!(d.tick(s(15)), DpdAction::SendRequest);
        assert_eq!(d.tick(s(29)), DpdAction::SendRequest);
        assert_eq!(d.tick(s(30)), DpdAction::Dead);
    }

    #[test]
    fn anything_received_resets_the_silence() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut d = Dpd::new(Duration::from_secs(10), t0);
        assert_eq!(d.tick(s(10)), DpdAction::SendRequest);
        d.received(s(12));
        assert_eq!(d.tick(s(21)), DpdAction::Nothing);
        assert_eq!(d.tick(s(41)), DpdAction::SendRequest);
        assert_eq!(d.tick(s(42)), DpdAction::Dead);
    }
}
