//! Retiring stacks that no live block uses any more, so that a full stack
//! map is never the reason allocations go unrecorded for good.
//!
//! Every recorded allocation interns its stack (`STACKS`) and bumps the
//! stack's cumulative figures (`STACK_STATS`). A target that allocates and
//! frees through ever new call paths (interpreters, JITs, recursion) fills
//! both maps with stacks whose blocks are long gone; once full, new stacks
//! cannot be interned and their allocations are recorded without one. So
//! when the maps fill (drops seen) or are half full, heapbpf takes the
//! figures of every idle stack out of the kernel (in batches), hands them
//! to user space ([`RetiredStack`]: the engine keeps them, see
//! [`crate::model::RetiredStacks`]) and deletes the idle stacks. A stack
//! that is used again is simply interned again.
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use aya::maps::HashMap as BpfHashMap;
use heapbpf_common::{
    drop_reason, names::maps, AllocInfo, AllocKey, StackKey, StackStats, StackTrace, TargetState,
};

use super::{drain::addresses, drain::units, map_fd, sys, Profiler};
use crate::{
    error::{Error, Result},
    model::{StackAddrs, StackCounters, DEFAULT_RETIRED_KEPT as RETIRED_KEPT},
};

/// Retire at most this often while drops keep coming.
const WHEN_DROPPING: Duration = Duration::from_millis(250);
/// Look at how full the maps are this often otherwise.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// One stack taken out of the kernel: whose, its cumulative figures, and
/// its addresses (unless another target still uses it, or it was gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetiredStack {
    pub tgid: u32,
    pub stack_id: u64,
    pub counters: StackCounters,
    pub addresses: Option<StackAddrs>,
}

/// When retirement last ran and what it had seen.
#[derive(Debug)]
pub(super) struct RetireState {
    last_run: Option<Instant>,
    last_check: Option<Instant>,
    /// Drops for full stack maps, summed over targets, at the last run.
    full_drops: u64,
}

impl RetireState {
    pub(super) fn new() -> Self {
        RetireState {
            last_run: None,
            last_check: None,
            full_drops: 0,
        }
    }
}

impl Profiler {
    /// Retires idle stacks when the stack maps filled since the last time
    /// (rate-limited) or are half full — or, `before_snapshot`, an eighth
    /// full, so that a snapshot holds the live stacks and the retired ones
    /// user space keeps, not every stack since the last retirement. Cheap
    /// when there is nothing to do: one lookup per target.
    pub fn maintain_stacks(
        &mut self,
        now: Instant,
        before_snapshot: bool,
    ) -> Result<Vec<RetiredStack>> {
        let full_drops = self.full_stack_drops();
        let since = |t: Option<Instant>| t.map_or(Duration::MAX, |t| now.duration_since(t));
        let dropping =
            full_drops > self.retire.full_drops && since(self.retire.last_run) >= WHEN_DROPPING;
        let check = before_snapshot || since(self.retire.last_check) >= CHECK_EVERY;
        if !dropping && !check {
            return Ok(Vec::new());
        }
        self.retire.last_check = Some(now);
        let stats = sys::lookup_all::<StackKey, StackStats>(map_fd(self.map(maps::STACK_STATS)?)?)
            .map_err(|e| Error::runtime("cannot read the STACK_STATS map", e))?;
        let distinct: HashSet<u64> = stats.iter().map(|(k, _)| k.stack_id).collect();
        let threshold = self.max_stacks / if before_snapshot { 8 } else { 2 };
        if !dropping && distinct.len() < threshold as usize {
            return Ok(Vec::new());
        }
        self.retire.last_run = Some(now);
        self.retire.full_drops = full_drops;
        let live: HashSet<u64> =
            sys::lookup_all::<AllocKey, AllocInfo>(map_fd(self.map(maps::ALLOCS)?)?)
                .map_err(|e| Error::runtime("cannot read the ALLOCS map", e))?
                .into_iter()
                .map(|(_, v)| v.stack_id)
                .collect();
        let idle = stats
            .into_iter()
            .filter(|(k, _)| !live.contains(&k.stack_id))
            .collect();
        let retired = self.retire(idle)?;
        tracing::info!(
            stacks = distinct.len(),
            retired = retired.len(),
            elapsed_ms = now.elapsed().as_millis() as u64,
            "idle stacks retired"
        );
        Ok(retired)
    }

    /// Takes `idle` (with their figures) out of `STACK_STATS` and their
    /// stacks out of `STACKS`. Addresses are read for the stacks that
    /// allocated most (the ones user space keeps: [`RETIRED_KEPT`]).
    fn retire(&mut self, mut idle: Vec<(StackKey, StackStats)>) -> Result<Vec<RetiredStack>> {
        idle.sort_by_key(|(_, s)| std::cmp::Reverse(s.allocated_bytes));
        let stacks = BpfHashMap::<_, u64, StackTrace>::try_from(self.map(maps::STACKS)?)
            .map_err(|e| Error::runtime("STACKS map", e))?;
        let retired: Vec<RetiredStack> = idle
            .iter()
            .enumerate()
            .map(|(i, (key, stats))| RetiredStack {
                tgid: key.tgid,
                stack_id: key.stack_id,
                counters: StackCounters {
                    allocated_bytes: stats.allocated_bytes,
                    allocations: units(stats.allocations),
                },
                addresses: (i < RETIRED_KEPT)
                    .then(|| stacks.get(&key.stack_id, 0).ok().map(|t| addresses(&t)))
                    .flatten(),
            })
            .collect();
        // Figures an allocation adds between the read above and the
        // delete are lost for its stack (the target's totals keep them).
        let keys: Vec<StackKey> = idle.iter().map(|(k, _)| *k).collect();
        sys::delete_batch(map_fd(self.map(maps::STACK_STATS)?)?, &keys)
            .map_err(|e| Error::runtime("cannot retire stacks from STACK_STATS", e))?;
        let mut ids: Vec<u64> = keys.iter().map(|k| k.stack_id).collect();
        ids.sort_unstable();
        ids.dedup();
        // An allocation that interns one of these again after this point
        // inserts it anew.
        sys::delete_batch(map_fd(self.map(maps::STACKS)?)?, &ids)
            .map_err(|e| Error::runtime("cannot retire stacks from STACKS", e))?;
        Ok(retired)
    }

    /// Drops of every target for full stack maps so far.
    fn full_stack_drops(&self) -> u64 {
        let Ok(map) = self.map(maps::TARGETS) else {
            return 0;
        };
        let Ok(targets) = BpfHashMap::<_, u32, TargetState>::try_from(map) else {
            return 0;
        };
        self.targets
            .keys()
            .filter_map(|pid| targets.get(pid, 0).ok())
            .map(|s| s.counters[drop_reason::STACKS_FULL] + s.counters[drop_reason::STATS_FULL])
            .sum()
    }
}
