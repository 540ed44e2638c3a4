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

use super::{map_fd, sys, Exec, Profiler};
use crate::{
    error::{Error, Result},
    model::{KernelData, LiveBlock, StackAddrs, StackCounters},
};

/// What the kernel counts for a target as it runs (estimates when sampled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveTotals {
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub dropped_events: u64,
}

impl Profiler {
    pub(super) fn target_state(&self, pid: u32) -> Option<TargetState> {
        let targets =
            BpfHashMap::<_, u32, TargetState>::try_from(self.map(maps::TARGETS).ok()?).ok()?;
        targets.get(&pid, 0).ok()
    }

    /// Live heap bytes of `pid` as counted by the kernel (cheap: one lookup).
    pub fn live_bytes(&self, pid: u32) -> Option<u64> {
        let s = self.target_state(pid)?;
        Some(s.allocated_bytes.saturating_sub(s.freed_bytes))
    }

    /// The kernel's running totals of `pid` (cheap: one lookup), `None` when
    /// it is not traced.
    pub fn totals(&self, pid: u32) -> Option<LiveTotals> {
        let s = self.target_state(pid)?;
        let (allocations, frees) = (units(s.allocations), units(s.frees));
        Some(LiveTotals {
            live_bytes: s.allocated_bytes.saturating_sub(s.freed_bytes),
            live_allocations: allocations.saturating_sub(frees),
            allocated_bytes: s.allocated_bytes,
            allocations,
            dropped_events: s.counters[..drop_reason::COUNT].iter().sum(),
        })
    }

    /// Reads the live blocks, per-stack counters and totals of `pid`: of the
    /// image it runs now (an `exec` not yet handled leaves the old image's
    /// out).
    pub fn drain(&self, pid: u32) -> Result<KernelData> {
        let state = self.target_state(pid).unwrap_or_default();
        self.read_image(pid, &state, state.image_ns, u64::MAX)
    }

    /// Reads what the image of `pid` before `exec` left: the blocks it
    /// allocated, its per-stack counters and its totals as the kernel kept
    /// them at the exec. Without the exec tracepoint ([`Exec::noticed`]),
    /// everything the kernel holds of `pid`.
    pub fn drain_before_exec(&self, pid: u32, exec: &Exec) -> Result<KernelData> {
        match &exec.before {
            Some(before) => self.read_image(pid, before, before.image_ns, exec.at_ns),
            None => self.drain(pid),
        }
    }

    /// The blocks of `pid` allocated in `[from_ns, until_ns)`, the
    /// per-stack counters of `state`'s generation, and `state`'s totals.
    fn read_image(
        &self,
        pid: u32,
        state: &TargetState,
        from_ns: u64,
        until_ns: u64,
    ) -> Result<KernelData> {
        let blocks = blocks_between(
            sys::lookup_all::<AllocKey, AllocInfo>(map_fd(self.map(maps::ALLOCS)?)?)
                .map_err(|e| Error::runtime("cannot read the ALLOCS map", e))?,
            pid,
            from_ns,
            until_ns,
        );
        let counters = counters_of(
            sys::lookup_all::<StackKey, StackStats>(map_fd(self.map(maps::STACK_STATS)?)?)
                .map_err(|e| Error::runtime("cannot read the STACK_STATS map", e))?,
            pid,
            state.generation,
        );
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
/// The blocks of `pid` allocated in `[from_ns, until_ns)`: one image's
/// (an `exec` starts a new image at a known time; blocks of the old one may
/// still be in the map, live or set aside).
fn blocks_between(
    entries: Vec<(AllocKey, AllocInfo)>,
    pid: u32,
    from_ns: u64,
    until_ns: u64,
) -> Vec<LiveBlock> {
    entries
        .into_iter()
        .filter(|(k, v)| k.tgid == pid && (from_ns..until_ns).contains(&v.timestamp_ns))
        .map(|(_, v)| LiveBlock {
            stack_id: v.stack_id,
            size_bytes: v.size,
            allocated_ns: v.timestamp_ns,
        })
        .collect()
}

/// The per-stack counters of `pid` counted in `generation` (one image's).
fn counters_of(
    entries: Vec<(StackKey, StackStats)>,
    pid: u32,
    generation: u64,
) -> HashMap<u64, StackCounters> {
    entries
        .into_iter()
        .filter(|(k, _)| k.tgid == pid && k.generation == generation as u32)
        .map(|(k, v)| {
            let c = StackCounters {
                allocated_bytes: v.allocated_bytes,
                allocations: units(v.allocations),
            };
            (k.stack_id, c)
        })
        .collect()
}

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

    fn block(tgid: u32, slot: u32, addr: u64, at_ns: u64) -> (AllocKey, AllocInfo) {
        let k = AllocKey { tgid, slot, addr };
        let v = AllocInfo {
            size: addr,
            stack_id: addr,
            timestamp_ns: at_ns,
        };
        (k, v)
    }

    #[test]
    fn an_exec_splits_the_blocks_of_a_process_by_time() {
        use heapbpf_common::alloc_slot::{ASIDE, LIVE};
        let exec_ns = 1_000;
        let entries = vec![
            block(7, LIVE, 0x10, 10),
            block(7, LIVE, 0x20, exec_ns - 1),
            // The new image got 0x20 too: the old block was set aside.
            block(7, ASIDE, 0x20, 20),
            block(7, LIVE, 0x30, exec_ns),
            block(7, LIVE, 0x40, exec_ns + 5),
            block(8, LIVE, 0x50, 10),
        ];
        let sizes = |blocks: Vec<LiveBlock>| {
            let mut v: Vec<(u64, u64)> = blocks
                .iter()
                .map(|b| (b.size_bytes, b.allocated_ns))
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(
            sizes(blocks_between(entries.clone(), 7, 0, exec_ns)),
            vec![(0x10, 10), (0x20, 20), (0x20, exec_ns - 1)],
            "the old image: everything before the exec, set aside or not"
        );
        assert_eq!(
            sizes(blocks_between(entries.clone(), 7, exec_ns, u64::MAX)),
            vec![(0x30, exec_ns), (0x40, exec_ns + 5)],
            "the new image: from the exec on"
        );
        assert_eq!(
            sizes(blocks_between(entries, 8, 0, u64::MAX)),
            vec![(0x50, 10)]
        );
    }

    #[test]
    fn per_stack_counters_are_read_per_generation() {
        let stats = |allocated_bytes| StackStats {
            allocated_bytes,
            allocations: 2 * heapbpf_common::COUNT_UNIT,
        };
        let key = |tgid, generation, stack_id| StackKey {
            tgid,
            generation,
            stack_id,
        };
        let entries = vec![
            (key(7, 0, 1), stats(100)),
            (key(7, 1, 1), stats(200)),
            (key(7, 1, 2), stats(300)),
            (key(8, 1, 3), stats(400)),
        ];
        let old = counters_of(entries.clone(), 7, 0);
        assert_eq!(old.len(), 1);
        assert_eq!(old[&1].allocated_bytes, 100);
        assert_eq!(old[&1].allocations, 2);
        let new = counters_of(entries.clone(), 7, 1);
        assert_eq!(new.len(), 2);
        assert_eq!(new[&1].allocated_bytes, 200);
        // Generations are kept in 32 bits in the key.
        assert_eq!(counters_of(entries, 7, (1 << 32) | 1).len(), 2);
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
