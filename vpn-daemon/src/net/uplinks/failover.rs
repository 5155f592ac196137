//! Which uplink carries client traffic: a pure decision from each uplink's
//! health, the one active now and the time, so its rules (priority order,
//! failover at once, failback only after a hold) are unit-tested without
//! links or clocks.

use std::time::{Duration, Instant};

/// An uplink as the decision sees it.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    /// Lower is preferred.
    pub priority: u32,
    /// Carrier up and probes answered.
    pub healthy: bool,
    /// Since when it has been healthy without a break.
    pub healthy_since: Option<Instant>,
}

/// Why traffic moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The first choice at start.
    Start,
    /// The active uplink (this one) went down.
    Down(usize),
    /// A preferred uplink (this one) has been healthy for the hold time.
    Recovered(usize),
}

/// A change of the active uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub to: usize,
    pub why: Why,
}

/// The uplink that should carry traffic at `now`, if it is not `active`:
/// the healthy one with the lowest priority (then the lowest index). A
/// down active uplink is left at once; a healthy one gives way only to a
/// preferred uplink healthy for `hold`, so a flapping link does not pull
/// traffic back and forth. At start (nothing active) with none healthy,
/// the first one is taken.
pub fn decide(
    links: &[Health],
    active: Option<usize>,
    hold: Duration,
    now: Instant,
) -> Option<Switch> {
    let best = |require_hold: bool| {
        (0..links.len())
            .filter(|&i| links[i].healthy)
            .filter(|&i| {
                !require_hold
                    || links[i]
                        .healthy_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= hold)
            })
            .min_by_key(|&i| (links[i].priority, i))
    };
    let (to, why) = match active {
        Some(a) if links.get(a).is_some_and(|l| l.healthy) => match best(true) {
            Some(b) if links[b].priority < links[a].priority => (b, Why::Recovered(b)),
            _ => return None,
        },
        Some(a) => (best(false)?, Why::Down(a)),
        None => (
            best(false).or((!links.is_empty()).then_some(0))?,
            Why::Start,
        ),
    };
    (Some(to) != active).then_some(Switch { to, why })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(priority: u32, healthy: bool, since: Option<Instant>) -> Health {
        Health {
            priority,
            healthy,
            healthy_since: since,
        }
    }

    const HOLD: Duration = Duration::from_secs(30);

    #[test]
    fn start_takes_the_preferred_healthy_uplink_or_the_first() {
        let t = Instant::now();
        let links = [link(20, true, Some(t)), link(10, true, Some(t))];
        assert_eq!(
            decide(&links, None, HOLD, t),
            Some(Switch {
                to: 1,
                why: Why::Start
            })
        );
        let down = [link(20, false, None), link(10, false, None)];
        assert_eq!(decide(&down, None, HOLD, t).map(|s| s.to), Some(0));
        assert_eq!(decide(&[], None, HOLD, t), None);
    }

    #[test]
    fn a_down_uplink_is_left_at_once_for_the_best_healthy_one() {
        let t = Instant::now();
        let links = [
            link(10, false, None),
            link(30, true, Some(t)),
            link(20, true, Some(t)),
        ];
        assert_eq!(
            decide(&links, Some(0), HOLD, t),
            Some(Switch {
                to: 2,
                why: Why::Down(0)
            }),
            "no hold time when the active one is down"
        );
        let all_down = [link(10, false, None), link(20, false, None)];
        assert_eq!(decide(&all_down, Some(0), HOLD, t), None, "nothing better");
    }

    #[test]
    fn failback_waits_for_the_hold_time() {
        let t = Instant::now();
        let back = t + Duration::from_secs(100);
        let links = [link(10, true, Some(back)), link(20, true, Some(t))];
        assert_eq!(decide(&links, Some(1), HOLD, back), None);
        assert_eq!(
            decide(
                &links,
                Some(1),
                HOLD,
                back + HOLD - Duration::from_millis(1)
            ),
            None
        );
        assert_eq!(
            decide(&links, Some(1), HOLD, back + HOLD),
            Some(Switch {
                to: 0,
                why: Why::Recovered(0)
            })
        );
        // A less preferred uplink never takes over from a healthy one.
        let links = [link(10, true, Some(t)), link(20, true, Some(t))];
        assert_eq!(decide(&links, Some(0), HOLD, back + HOLD), None);
    }
}
