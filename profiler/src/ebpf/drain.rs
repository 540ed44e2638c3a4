//! Reading what the kernel holds for a target — live blocks, per-stack
//! counters, totals and stack addresses — as plain data for
//! [`crate::model`], which aggregates it.
use std::collections::HashMap;

use aya::maps::HashMap as BpfHashMap;
use heapbpf_common::names::maps;
use heapbpf_common::{
    drop_reason, info_counter, AllocInfo, AllocKey, StackKey, StackStats, StackTrace, TargetState,
    NO_STACK, STACK_COMPLETE, STACK_LEN_MASK, STACK_TRUNCATED,
};

use super::{map_fd, sys, Profiler};
use crate::{
    error::{Error, Result},
    model::{KernelData, LiveBlock, StackAddrs, StackCounters},
};

impl Profiler {
    fn target_state(&self, pid: u32) -> Option<TargetState> {
        let targets =
            BpfHashMap::<_, u32, TargetState>::try_from(self.map(maps::TARGETS).ok()?).ok()?;
        targets.get(&pid, 0).ok()
    }

    /// Live heap bytes of `pid` as counted by the kernel (cheap: one lookup).
    pub fn live_bytes(&self, pid: u32) -> Option<u64> {
        let s = self.target_state(pid)?;
        Some(s.allocated_bytes.saturating_sub(s.freed_bytes))
    }

    /// Reads the live blocks, per-stack counters and totals of `pid`.
    pub fn drain(&self, pid: u32) -> Result<KernelData> {
        let state = self.target_state(pid).unwrap_or_default();
        let blocks: Vec<LiveBlock> =
            sys::lookup_all::<AllocKey, AllocInfo>(map_fd(self.map(maps::ALLOCS)?)?)
                .map_err(|e| Error::runtime("cannot read the ALLOCS map", e))?
                .into_iter()
                .filter(|(k, _)| k.tgid == pid)
                .map(|(_, v)| LiveBlock {
                    stack_id: v.stack_id,
                    size_bytes: v.size,
                    allocated_ns: v.timestamp_ns,
                })
                .collect();
        let counters: HashMap<u64, StackCounters> =
            sys::lookup_all::<StackKey, StackStats>(map_fd(self.map(maps::STACK_STATS)?)?)
                .map_err(|e| Error::runtime("cannot read the STACK_STATS map", e))?
                .into_iter()
                .filter(|(k, _)| k.tgid == pid)
                .map(|(k, v)| {
                    let c = StackCounters {
                        allocated_bytes: v.allocated_bytes,
                        allocations: units(v.allocations),
                    };
                    (k.stack_id, c)
                })
                .collect();
        tracing::debug!(
            pid,
            nested = state.counters[info_counter::NESTED],
            stale_replaced = state.counters[info_counter::STALE_REPLACED],
            untracked_frees = state.counters[info_counter::UNTRACKED_FREES],
            dropped = ?&state.counters[..drop_reason::COUNT],
            "kernel counters"
        );
        Ok(KernelData {
            pid,
            blocks,
            counters,
            allocated_bytes: state.allocated_bytes,
            allocations: units(state.allocations),
            frees: units(state.frees),
            dropped_events: state.counters[..drop_reason::COUNT].iter().sum(),
            dropped: DROP_REASONS
                .iter()
                .map(|&(i, name)| (name.to_string(), state.counters[i]))
                .filter(|&(_, n)| n > 0)
                .collect(),
        })
    }

    /// The addresses of stacks `ids` of `pid`. Only the stacks asked for
    /// last are kept for the next call: the cache follows the target's live
    /// stacks instead of growing with every stack it ever had.
    pub fn stacks(&mut self, pid: u32, ids: &[u64]) -> Result<HashMap<u64, StackAddrs>> {
        let map = self
            .ebpf
            .map(maps::STACKS)
            .ok_or_else(|| Error::Runtime("heapbpf's eBPF object has no map STACKS".into()))?;
        let stack_map = BpfHashMap::<_, u64, StackTrace>::try_from(map)
            .map_err(|e| Error::runtime("STACKS map", e))?;
        Ok(self.stacks.resolve(pid, ids, |id| {
            stack_map.get(&id, 0).ok().map(|t| addresses(&t))
        }))
    }
}

/// The kernel's drop counters by the names snapshots give them.
const DROP_REASONS: [(usize, &str); drop_reason::COUNT] = [
    (drop_reason::ALLOCS_FULL, "allocs_full"),
    (drop_reason::STACKS_FULL, "stacks_full"),
    (drop_reason::STACK_ERROR, "stack_error"),
    (drop_reason::PENDING_FULL, "pending_full"),
    (drop_reason::STATS_FULL, "stats_full"),
    (drop_reason::READ_ERROR, "read_error"),
];

/// A stack as the kernel keeps it → its addresses and the walk's verdict.
pub(super) fn addresses(t: &StackTrace) -> StackAddrs {
    let n = ((t.len & STACK_LEN_MASK) as usize).min(t.ips.len());
    StackAddrs {
        ips: t.ips[..n].to_vec(),
        truncated: if t.len & STACK_TRUNCATED != 0 {
            Some(true)
        } else if t.len & STACK_COMPLETE != 0 {
            Some(false)
        } else {
            None
        },
    }
}

/// Stack addresses per target, as of the last snapshot of each.
#[derive(Default)]
pub(super) struct StackCache {
    targets: HashMap<u32, HashMap<u64, StackAddrs>>,
}

impl StackCache {
    /// The stacks `ids` of `pid`, from the cache or `fetch`; afterwards the
    /// cache holds exactly these for `pid`.
    fn resolve(
        &mut self,
        pid: u32,
        ids: &[u64],
        mut fetch: impl FnMut(u64) -> Option<StackAddrs>,
    ) -> HashMap<u64, StackAddrs> {
        let mut old = self.targets.remove(&pid).unwrap_or_default();
        let mut now = HashMap::with_capacity(ids.len());
        for &id in ids {
            if id == NO_STACK || now.contains_key(&id) {
                continue;
            }
            if let Some(s) = old.remove(&id).or_else(|| fetch(id)) {
                now.insert(id, s);
            }
        }
        self.targets.insert(pid, now.clone());
        now
    }

    pub(super) fn forget(&mut self, pid: u32) {
        self.targets.remove(&pid);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.targets.values().map(HashMap::len).sum()
    }
}

/// Kernel counts are in thousandths (sampled weights are fractional).
pub(super) fn units(v: u64) -> u64 {
    let unit = heapbpf_common::COUNT_UNIT;
    (v + unit / 2) / unit
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(ip: u64) -> StackAddrs {
        StackAddrs {
            ips: vec![ip],
            truncated: Some(false),
        }
    }

    #[test]
    fn the_stack_cache_keeps_only_the_last_snapshots_stacks() {
        let mut cache = StackCache::default();
        let fetched = std::cell::RefCell::new(Vec::new());
        let fetch = |id| {
            fetched.borrow_mut().push(id);
            Some(stack(id))
        };
        let got = cache.resolve(1, &[10, 11, NO_STACK, 10], fetch);
        assert_eq!(got.len(), 2);
        // 11 is gone from the target: it leaves the cache; 10 is not read again.
        let got = cache.resolve(1, &[10, 12], fetch);
        assert_eq!(got[&12], stack(12));
        assert_eq!(*fetched.borrow(), vec![10, 11, 12]);
        assert_eq!(cache.len(), 2);
        cache.resolve(2, &[10], fetch);
        assert_eq!(cache.len(), 3);
        cache.forget(1);
        assert_eq!(cache.len(), 1);
    }
}
