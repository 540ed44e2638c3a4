//! Figures of stacks retired from the kernel (no live block used them any
//! more; see `ebpf::retire`), kept in user space so that snapshots still
//! show what each allocated since attach — bounded: the stacks with the most
//! allocated bytes are kept, the rest only count in the target's totals.
use std::collections::HashMap;

use super::{KernelData, StackAddrs, StackCounters};

/// Retired stacks kept per target by default.
pub const DEFAULT_RETIRED_KEPT: usize = 4096;

/// The retired stacks of one target.
#[derive(Clone, Debug)]
pub struct RetiredStacks {
    kept: HashMap<u64, (StackCounters, Option<StackAddrs>)>,
    limit: usize,
    /// Stacks let go beyond the limit (their figures stay in the totals).
    pub let_go: u64,
}

impl Default for RetiredStacks {
    fn default() -> Self {
        RetiredStacks::new(DEFAULT_RETIRED_KEPT)
    }
}

impl RetiredStacks {
    pub fn new(limit: usize) -> Self {
        RetiredStacks {
            kept: HashMap::new(),
            limit: limit.max(1),
            let_go: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Adds a retired stack's figures (to those it had if it was retired
    /// before); keeps its addresses.
    /// A stack without addresses (not among those whose addresses were
    /// read) is let go at once unless it is kept already.
    pub fn add(&mut self, stack_id: u64, counters: StackCounters, addresses: Option<StackAddrs>) {
        if addresses.is_none() && !self.kept.contains_key(&stack_id) {
            self.let_go += 1;
            return;
        }
        let e = self.kept.entry(stack_id).or_default();
        e.0.allocated_bytes = e.0.allocated_bytes.saturating_add(counters.allocated_bytes);
        e.0.allocations = e.0.allocations.saturating_add(counters.allocations);
        if addresses.is_some() {
            e.1 = addresses;
        }
        if self.kept.len() >= 2 * self.limit {
            self.shrink();
        }
    }

    /// Keeps the `limit` stacks with the most allocated bytes.
    fn shrink(&mut self) {
        let mut all: Vec<_> = self.kept.drain().collect();
        all.sort_by(|a, b| {
            b.1 .0
                .allocated_bytes
                .cmp(&a.1 .0.allocated_bytes)
                .then(a.0.cmp(&b.0))
        });
        self.let_go += all.len().saturating_sub(self.limit) as u64;
        all.truncate(self.limit);
        self.kept = all.into_iter().collect();
    }

    /// Adds the kept figures to what the kernel holds now (a stack used
    /// again since it was retired has figures in both).
    pub fn merge_counters(&self, data: &mut KernelData) {
        for (&id, (c, _)) in &self.kept {
            let e = data.counters.entry(id).or_default();
            e.allocated_bytes = e.allocated_bytes.saturating_add(c.allocated_bytes);
            e.allocations = e.allocations.saturating_add(c.allocations);
        }
    }

    /// Addresses of retired stacks the kernel no longer has.
    pub fn fill_addresses(&self, addresses: &mut HashMap<u64, StackAddrs>) {
        for (&id, (_, a)) in &self.kept {
            if let Some(a) = a {
                addresses.entry(id).or_insert_with(|| a.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(bytes: u64) -> StackCounters {
        StackCounters {
            allocated_bytes: bytes,
            allocations: 1,
        }
    }

    fn a(ip: u64) -> Option<StackAddrs> {
        Some(StackAddrs {
            ips: vec![ip],
            truncated: Some(false),
        })
    }

    #[test]
    fn retired_figures_join_the_kernels() {
        let mut r = RetiredStacks::new(10);
        r.add(7, c(100), a(0x70));
        r.add(7, c(50), None);
        let mut data = KernelData {
            counters: HashMap::from([(7, c(1)), (8, c(2))]),
            ..Default::default()
        };
        r.merge_counters(&mut data);
        assert_eq!(data.counters[&7].allocated_bytes, 151);
        assert_eq!(data.counters[&7].allocations, 3);
        assert_eq!(data.counters[&8].allocated_bytes, 2);
        let mut addrs = HashMap::new();
        r.fill_addresses(&mut addrs);
        assert_eq!(addrs[&7].ips, vec![0x70]);
    }

    #[test]
    fn only_the_largest_are_kept() {
        let mut r = RetiredStacks::new(3);
        for id in 0..100u64 {
            r.add(id, c(id), a(id));
        }
        assert!(r.len() < 6, "bounded: {}", r.len());
        let mut data = KernelData::default();
        r.merge_counters(&mut data);
        // The largest always survive.
        for id in [99, 98, 97] {
            assert!(data.counters.contains_key(&id), "{id}");
        }
        assert_eq!(r.let_go as usize + r.len(), 100);
        // Without addresses, only a stack kept already gains figures.
        r.add(1000, c(5), None);
        r.add(99, c(1), None);
        let mut data = KernelData::default();
        r.merge_counters(&mut data);
        assert!(!data.counters.contains_key(&1000));
        assert_eq!(data.counters[&99].allocated_bytes, 100);
    }
}
