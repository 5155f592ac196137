//! The identity journal: every change to who holds which VPN address,
//! numbered, with the state they lead to. The session manager records a
//! change where the table changes (a login, a restore, a policy move, an
//! end); the identity feed (`identity/`) serves the state and the
//! changes, and the event log gets each change too.
//!
//! A removal is recorded before the address goes back to the pool, so a
//! consumer always sees an address's old holder leave before a new one
//! comes.

use std::{collections::VecDeque, net::IpAddr};

use parking_lot::Mutex;
use rand::RngCore as _;
use tokio::sync::watch;

use crate::proto::identity::{Change, Mapping, MappingSet, Op, Snapshot};

/// What the journal keeps, under one lock so a snapshot and its sequence
/// number always agree.
struct Inner {
    seq: u64,
    current: MappingSet,
    recent: VecDeque<Change>,
}

/// The journal of one vpnd run.
pub struct Journal {
    /// Random per run: positions of another run mean nothing here.
    epoch: String,
    /// How many recent changes a consumer can resume across.
    keep: usize,
    inner: Mutex<Inner>,
    latest: watch::Sender<u64>,
}

impl Journal {
    /// An empty journal keeping the last `keep` changes (at least 1).
    pub fn new(keep: usize) -> Self {
        let mut e = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut e);
        Journal {
            epoch: hex::encode(e),
            keep: keep.max(1),
            inner: Mutex::new(Inner {
                seq: 0,
                current: MappingSet::default(),
                recent: VecDeque::new(),
            }),
            latest: watch::channel(0).0,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Records `op` on `m` (keyed by its session); returns the change.
    pub fn record(&self, op: Op, m: Mapping) -> Change {
        let mut i = self.inner.lock();
        i.seq += 1;
        i.current.apply(op, m.clone());
        let change = Change {
            seq: i.seq,
            op,
            mapping: m,
        };
        if i.recent.len() == self.keep {
            i.recent.pop_front();
        }
        i.recent.push_back(change.clone());
        let seq = i.seq;
        drop(i);
        self.latest.send_replace(seq);
        change
    }

    /// The number of the last change (0 = none yet).
    pub fn seq(&self) -> u64 {
        self.inner.lock().seq
    }

    /// Every mapping now, and the number of the last change.
    pub fn snapshot(&self) -> Snapshot {
        let i = self.inner.lock();
        Snapshot {
            epoch: self.epoch.clone(),
            seq: i.seq,
            mappings: i.current.all(),
        }
    }

    /// The changes after `seq`, in order; `None` when some of them are no
    /// longer kept (or `seq` is ahead): the consumer needs a snapshot.
    pub fn after(&self, seq: u64) -> Option<Vec<Change>> {
        let i = self.inner.lock();
        if seq > i.seq {
            return None;
        }
        let first = i.recent.front().map_or(i.seq + 1, |c| c.seq);
        if seq + 1 < first {
            return None;
        }
        Some(i.recent.iter().filter(|c| c.seq > seq).cloned().collect())
    }

    /// The mapping that holds `a` now.
    pub fn lookup(&self, a: IpAddr) -> Option<Mapping> {
        self.inner.lock().current.lookup(a).cloned()
    }

    /// Wakes up when a change is recorded (its value: the last sequence
    /// number).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, user: &str, last: u8) -> Mapping {
        Mapping {
            session_id: id,
            user: user.into(),
            group: "staff".into(),
            groups: vec![],
            policy: None,
            address: std::net::Ipv4Addr::new(198, 19, 0, last),
            address6: None,
            since: "2026-12-04T23:00:00Z".into(),
        }
    }

    #[test]
    fn changes_are_numbered_and_the_snapshot_follows_them() {
        let j = Journal::new(100);
        let rx = j.subscribe();
        assert_eq!(j.record(Op::Add, m(1, "alice", 10)).seq, 1);
        assert_eq!(j.record(Op::Add, m(2, "bob", 11)).seq, 2);
        let mut moved = m(1, "alice", 10);
        moved.policy = Some("eng".into());
        j.record(Op::Update, moved.clone());
        j.record(Op::Remove, m(2, "bob", 11));
        assert_eq!(*rx.borrow(), 4);
        let s = j.snapshot();
        assert_eq!((s.seq, s.mappings.clone()), (4, vec![moved.clone()]));
        assert_eq!(j.lookup("198.19.0.10".parse().unwrap()), Some(moved));
        assert_eq!(j.lookup("198.19.0.11".parse().unwrap()), None);
        let after: Vec<(u64, Op)> = j.after(1).unwrap().iter().map(|c| (c.seq, c.op)).collect();
        assert_eq!(after, [(2, Op::Add), (3, Op::Update), (4, Op::Remove)]);
        assert_eq!(j.after(4).unwrap(), []);
        assert_eq!(j.after(5), None, "ahead of the journal");
    }

    #[test]
    fn a_position_older_than_what_is_kept_needs_a_snapshot() {
        let j = Journal::new(3);
        for n in 1..=5u8 {
            j.record(Op::Add, m(n.into(), "u", n));
        }
        // Kept: 3, 4, 5.
        assert_eq!(j.after(1), None);
        assert_eq!(j.after(2).unwrap().len(), 3);
        assert_eq!(j.after(0), None);
        assert_eq!(j.snapshot().mappings.len(), 5);
        // A fresh journal resumes from 0.
        assert_eq!(Journal::new(3).after(0).unwrap(), []);
        assert_ne!(Journal::new(3).epoch(), Journal::new(3).epoch());
    }
}
