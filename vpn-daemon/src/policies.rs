//! The group policies installed in the data path, and how they change.
//!
//! Every policy version has its own id and its own rule-hit slots. A change
//! (reload) installs the new version completely under a new id, flips each
//! session's `policy_id` (one map update per address), and only then removes
//! the old version, so no packet ever sees half a policy. Unchanged policies
//! keep their id and hit counters.

use std::{collections::HashMap, sync::Arc};

use ipnet::IpNet;
use vpn_common::{MAX_INTERVALS, MAX_RULE_SLOTS};

use crate::{
    datapath::{DatapathOps, bpf::MapWriteError},
    policy::PolicyDef,
    policy::{self, CompileError, Compiled},
};

/// One installed policy version.
#[derive(Debug)]
pub struct Installed {
    pub id: u32,
    pub def: PolicyDef,
    pub compiled: Compiled,
    pub first_slot: u32,
    /// Where its intervals start in `policy_intervals`.
    pub first_interval: u32,
}

/// What one [`PolicySet::apply`] changed.
pub struct Applied {
    /// Versions replaced or gone: retire them once no session uses them.
    pub old: Vec<Arc<Installed>>,
    /// Versions it installed.
    fresh: Vec<Arc<Installed>>,
    /// The set and default before it.
    previous: HashMap<String, Arc<Installed>>,
    previous_default: Option<String>,
}

/// First-fit allocator of contiguous rule-hit slots.
struct Slots {
    used: Vec<bool>,
}

impl Slots {
    fn alloc(&mut self, n: usize) -> Option<u32> {
        let n = n.max(1);
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == n {
                let start = i + 1 - n;
                self.used[start..=i].iter_mut().for_each(|u| *u = true);
                return Some(start as u32);
            }
        }
        None
    }

    fn free(&mut self, start: u32, n: usize) {
        let s = start as usize;
        self.used[s..s + n.max(1)]
            .iter_mut()
            .for_each(|u| *u = false);
    }
}

pub struct PolicySet {
    current: HashMap<String, Arc<Installed>>,
    default: Option<String>,
    next_id: u32,
    slots: Slots,
    intervals: Slots,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet {
            current: HashMap::new(),
            default: None,
            next_id: 1,
            slots: Slots {
                used: vec![false; MAX_RULE_SLOTS as usize],
            },
            intervals: Slots {
                used: vec![false; MAX_INTERVALS as usize],
            },
        }
    }
}

/// Why a policy set could not be installed (nothing changed) or its
/// sessions not moved to it (everything was rolled back).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy '{policy}' {cause}")]
    Compile { policy: String, cause: CompileError },
    #[error("policy '{policy}': no room for {rules} more rule counters (all {max} in use)", max = MAX_RULE_SLOTS)]
    NoRuleCounters { policy: String, rules: usize },
    #[error("policy '{policy}': no room for {intervals} more port intervals (all {max} in use)", max = MAX_INTERVALS)]
    NoIntervals { policy: String, intervals: usize },
    #[error("policy '{policy}': {cause}")]
    Install {
        policy: String,
        cause: MapWriteError,
    },
    #[error("moving sessions to their new policies: {0}")]
    MoveSessions(MapWriteError),
}

/// Why a policy name could not be resolved: the login is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("group policy '{0}' does not exist")]
pub struct MissingPolicy(pub String);

impl PolicySet {
    /// Makes `defs` the installed policies. Unchanged ones stay as they
    /// are; new and changed ones are installed under new ids. Returns what
    /// changed: once every session points at the new versions, remove the
    /// replaced ones with [`PolicySet::retire`]; if that cannot be done,
    /// [`PolicySet::rollback`] restores the set as it was. On error nothing
    /// changes.
    pub fn apply(
        &mut self,
        dp: &mut dyn DatapathOps,
        defs: &[PolicyDef],
        default: Option<String>,
        split: &[IpNet],
        max_entries: usize,
    ) -> Result<Applied, PolicyError> {
        let mut fresh: Vec<Arc<Installed>> = Vec::new();
        let mut next = HashMap::new();
        for def in defs {
            if let Some(cur) = self.current.get(&def.name).filter(|c| &c.def == def) {
                next.insert(def.name.clone(), cur.clone());
                continue;
            }
            let installed = match self.install(dp, def, split, max_entries) {
                Ok(i) => Arc::new(i),
                Err(e) => {
                    for f in fresh {
                        self.remove(dp, &f);
                    }
                    return Err(e);
                }
            };
            fresh.push(installed.clone());
            next.insert(def.name.clone(), installed);
        }
        let old: Vec<Arc<Installed>> = self
            .current
            .values()
            .filter(|c| !next.values().any(|n| n.id == c.id))
            .cloned()
            .collect();
        let previous = std::mem::replace(&mut self.current, next);
        let previous_default = std::mem::replace(&mut self.default, default);
        Ok(Applied {
            old,
            fresh,
            previous,
            previous_default,
        })
    }

    /// Undoes an [`PolicySet::apply`] whose sessions could not all be moved
    /// (they were moved back): the new versions are removed and the set is
    /// as it was.
    pub fn rollback(&mut self, dp: &mut dyn DatapathOps, applied: Applied) {
        for f in &applied.fresh {
            self.remove(dp, f);
        }
        self.current = applied.previous;
        self.default = applied.previous_default;
    }

    fn install(
        &mut self,
        dp: &mut dyn DatapathOps,
        def: &PolicyDef,
        split: &[IpNet],
        max_entries: usize,
    ) -> Result<Installed, PolicyError> {
        let first_slot =
            self.slots
                .alloc(def.rules.len())
                .ok_or_else(|| PolicyError::NoRuleCounters {
                    policy: def.name.clone(),
                    rules: def.rules.len(),
                })?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let mut first_interval = None;
        let built = policy::compile(id, &def.rules, first_slot, split, max_entries)
            .map_err(|cause| PolicyError::Compile {
                policy: def.name.clone(),
                cause,
            })
            .and_then(|compiled| {
                let start = self.intervals.alloc(compiled.intervals()).ok_or_else(|| {
                    PolicyError::NoIntervals {
                        policy: def.name.clone(),
                        intervals: compiled.intervals(),
                    }
                })?;
                first_interval = Some((start, compiled.intervals()));
                let install = |cause| PolicyError::Install {
                    policy: def.name.clone(),
                    cause,
                };
                dp.reset_hits(first_slot..first_slot + def.rules.len() as u32)
                    .map_err(install)?;
                dp.install_policy(id, def.info, &compiled, start)
                    .map_err(install)?;
                Ok(compiled)
            });
        match built {
            Ok(compiled) => {
                tracing::info!(
                    policy = def.name,
                    id,
                    rules = def.rules.len(),
                    entries = compiled.entries(),
                    "installed group policy"
                );
                Ok(Installed {
                    id,
                    def: def.clone(),
                    first_interval: first_interval.expect("set on success").0,
                    compiled,
                    first_slot,
                })
            }
            Err(e) => {
                self.slots.free(first_slot, def.rules.len());
                if let Some((start, n)) = first_interval {
                    self.intervals.free(start, n);
                }
                Err(e)
            }
        }
    }

    fn remove(&mut self, dp: &mut dyn DatapathOps, p: &Installed) {
        dp.remove_policy(p.id, &p.compiled);
        self.slots.free(p.first_slot, p.def.rules.len());
        self.intervals
            .free(p.first_interval, p.compiled.intervals());
    }

    /// Removes versions returned by [`PolicySet::apply`].
    pub fn retire(&mut self, dp: &mut dyn DatapathOps, old: Vec<Arc<Installed>>) {
        for p in old {
            self.remove(dp, &p);
        }
    }

    /// The policy for a user whose own policy is `own`: their own, else
    /// the default, else none (id 0: everything allowed); a scheduled policy
    /// outside its window gives way to its fallback. A name that does not
    /// exist is an error, never silently more access.
    pub fn resolve(&self, own: Option<&str>) -> Result<Option<Arc<Installed>>, MissingPolicy> {
        self.resolve_at(own, crate::policy::local_now())
    }

    /// [`PolicySet::resolve`] at a given weekday (0 = Monday) and minute.
    pub fn resolve_at(
        &self,
        own: Option<&str>,
        (day, minute): (u8, u16),
    ) -> Result<Option<Arc<Installed>>, MissingPolicy> {
        let Some(name) = own.or(self.default.as_deref()) else {
            return Ok(None);
        };
        let p = self
            .current
            .get(name)
            .ok_or_else(|| MissingPolicy(name.to_owned()))?;
        match &p.def.schedule {
            Some((sched, fallback)) if !sched.active(day, minute) => self
                .current
                .get(fallback)
                .cloned()
                .map(Some)
                .ok_or_else(|| MissingPolicy(fallback.clone())),
            _ => Ok(Some(p.clone())),
        }
    }

    /// Whether any installed policy's schedule is active at `now`: a
    /// change from one minute to the next means sessions must be re-bound.
    pub fn schedule_state(&self, now: (u8, u16)) -> Vec<bool> {
        self.all()
            .iter()
            .filter_map(|p| p.def.schedule.as_ref().map(|(s, _)| s.active(now.0, now.1)))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Installed>> {
        self.current.get(name).cloned()
    }

    pub fn default_name(&self) -> Option<&str> {
        self.default.as_deref()
    }

    /// Installed policies by name.
    pub fn all(&self) -> Vec<Arc<Installed>> {
        let mut v: Vec<_> = self.current.values().cloned().collect();
        v.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_first_fit() {
        let mut s = Slots {
            used: vec![false; 10],
        };
        assert_eq!(s.alloc(4), Some(0));
        assert_eq!(s.alloc(4), Some(4));
        assert_eq!(s.alloc(4), None);
        s.free(0, 4);
        assert_eq!(s.alloc(2), Some(0));
        assert_eq!(s.alloc(0), Some(2), "an empty policy still takes one slot");
    }
}
