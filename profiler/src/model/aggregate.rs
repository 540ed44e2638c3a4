//! Live blocks and per-stack counters → per-stack figures.
use std::collections::{BTreeMap, HashMap};

/// One live block as recorded in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveBlock {
    pub stack_id: u64,
    pub size_bytes: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the allocation.
    pub allocated_ns: u64,
}

/// Cumulative counters of one stack since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCounters {
    pub allocated_bytes: u64,
    pub allocations: u64,
}

/// One stack of a raw snapshot: addresses, not yet symbolized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawStack {
    pub stack_id: u64,
    /// Return addresses, innermost first (`ips[0]` is in the allocator's caller).
    pub ips: Vec<u64>,
    /// What the stack walk knew: `Some(true)` it stopped short of the root,
    /// `Some(false)` it reached it, `None` it cannot tell (the kernel's
    /// frame-pointer walk; decided from the outermost frame's symbol).
    pub truncated: Option<bool>,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub oldest_age_ms: u64,
}

/// What the kernel holds for one target at one moment, read out as is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelData {
    pub pid: u32,
    pub blocks: Vec<LiveBlock>,
    pub counters: HashMap<u64, StackCounters>,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub frees: u64,
    pub dropped_events: u64,
    /// `dropped_events` by reason (`stacks_full`, ...), the non-zero ones.
    pub dropped: BTreeMap<String, u64>,
}

impl KernelData {
    /// Every stack the blocks and counters name, each once.
    pub fn stack_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .blocks
            .iter()
            .map(|b| b.stack_id)
            .chain(self.counters.keys().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The addresses of one stack, and what the walk knew of its end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackAddrs {
    /// Return addresses, innermost first.
    pub ips: Vec<u64>,
    /// See [`RawStack::truncated`].
    pub truncated: Option<bool>,
}

/// Everything the kernel said about one target at one moment, per stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawSnapshot {
    pub pid: u32,
    pub stacks: Vec<RawStack>,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub frees: u64,
    pub dropped_events: u64,
    pub dropped: BTreeMap<String, u64>,
}

impl RawSnapshot {
    /// Aggregates what the kernel holds (see [`aggregate`]) and gives each
    /// stack its addresses (stacks not in `stacks` keep none).
    pub fn from_kernel(
        data: KernelData,
        stacks: &HashMap<u64, StackAddrs>,
        now_ns: u64,
        min_age_ms: u64,
        sample_bytes: u64,
    ) -> RawSnapshot {
        let mut per_stack = aggregate(
            data.blocks,
            &data.counters,
            now_ns,
            min_age_ms,
            sample_bytes,
        );
        for s in &mut per_stack {
            if let Some(a) = stacks.get(&s.stack_id) {
                s.ips = a.ips.clone();
                s.truncated = a.truncated;
            }
        }
        RawSnapshot {
            pid: data.pid,
            stacks: per_stack,
            allocated_bytes: data.allocated_bytes,
            allocations: data.allocations,
            frees: data.frees,
            dropped_events: data.dropped_events,
            dropped: data.dropped,
        }
    }
}

/// What a block of `size` bytes stands for when sampled every `sample_bytes`
/// bytes on average (Poisson by bytes): (bytes, allocations) = (s/p, 1/p)
/// with p = 1 - exp(-s/R). Exact mode (R = 0): (s, 1).
pub fn sample_weight(size: u64, sample_bytes: u64) -> (f64, f64) {
    if sample_bytes == 0 {
        return (size as f64, 1.0);
    }
    let p = -(-(size as f64) / sample_bytes as f64).exp_m1();
    if p <= 0.0 {
        return (
            sample_bytes as f64,
            sample_bytes as f64 / size.max(1) as f64,
        );
    }
    (size as f64 / p, 1.0 / p)
}

/// Aggregates live blocks per stack, weighting sampled blocks (see
/// [`sample_weight`]). Blocks younger than `min_age_ms` are left out of the
/// live figures (leak suspects); cumulative figures come from `counters`
/// unfiltered. Stacks with neither live blocks nor allocations are
/// dropped. Sorted by live bytes, largest first (ties: most allocated, then id,
/// so the order is stable).
pub fn aggregate(
    blocks: impl IntoIterator<Item = LiveBlock>,
    counters: &HashMap<u64, StackCounters>,
    now_ns: u64,
    min_age_ms: u64,
    sample_bytes: u64,
) -> Vec<RawStack> {
    let mut by_stack: HashMap<u64, RawStack> = HashMap::new();
    let mut weights: HashMap<u64, (f64, f64)> = HashMap::new();
    for b in blocks {
        let age_ms = now_ns.saturating_sub(b.allocated_ns) / 1_000_000;
        if age_ms < min_age_ms {
            continue;
        }
        let s = by_stack.entry(b.stack_id).or_insert_with(|| RawStack {
            stack_id: b.stack_id,
            ..Default::default()
        });
        s.oldest_age_ms = s.oldest_age_ms.max(age_ms);
        let (wb, wc) = sample_weight(b.size_bytes, sample_bytes);
        let w = weights.entry(b.stack_id).or_default();
        w.0 += wb;
        w.1 += wc;
    }
    for (id, (wb, wc)) in weights {
        if let Some(s) = by_stack.get_mut(&id) {
            s.live_bytes = wb.round() as u64;
            s.live_allocations = (wc.round() as u64).max(1);
        }
    }
    for (&id, c) in counters {
        let s = by_stack.entry(id).or_insert_with(|| RawStack {
            stack_id: id,
            ..Default::default()
        });
        s.allocated_bytes = c.allocated_bytes;
        s.allocations = c.allocations;
    }
    let mut stacks: Vec<RawStack> = by_stack
        .into_values()
        .filter(|s| s.live_allocations > 0 || (min_age_ms == 0 && s.allocations > 0))
        .collect();
    stacks.sort_by(|a, b| {
        b.live_bytes
            .cmp(&a.live_bytes)
            .then(b.allocated_bytes.cmp(&a.allocated_bytes))
            .then(a.stack_id.cmp(&b.stack_id))
    });
    stacks
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn block(stack_id: u64, size_bytes: u64, allocated_ns: u64) -> LiveBlock {
        LiveBlock {
            stack_id,
            size_bytes,
            allocated_ns,
        }
    }

    #[test]
    fn sums_live_blocks_per_stack_and_sorts() {
        let blocks = [
            block(1, 100, 0),
            block(2, 5000, 10 * MS),
            block(1, 300, 500 * MS),
        ];
        let mut counters = HashMap::new();
        counters.insert(
            1,
            StackCounters {
                allocated_bytes: 1400,
                allocations: 5,
            },
        );
        counters.insert(
            2,
            StackCounters {
                allocated_bytes: 5000,
                allocations: 1,
            },
        );
        // A stack whose blocks are all freed still shows what it allocated.
        counters.insert(
            3,
            StackCounters {
                allocated_bytes: 64,
                allocations: 1,
            },
        );
        let stacks = aggregate(blocks, &counters, 1000 * MS, 0, 0);
        assert_eq!(
            stacks.iter().map(|s| s.stack_id).collect::<Vec<_>>(),
            vec![2, 1, 3]
        );
        assert_eq!((stacks[1].live_bytes, stacks[1].live_allocations), (400, 2));
        assert_eq!(stacks[1].oldest_age_ms, 1000);
        assert_eq!(
            (stacks[1].allocated_bytes, stacks[1].allocations),
            (1400, 5)
        );
        assert_eq!((stacks[2].live_bytes, stacks[2].allocated_bytes), (0, 64));
    }

    #[test]
    fn min_age_keeps_only_old_blocks() {
        let blocks = [
            block(1, 100, 0),
            block(1, 100, 900 * MS),
            block(2, 7, 950 * MS),
        ];
        let stacks = aggregate(blocks, &HashMap::new(), 1000 * MS, 500, 0);
        assert_eq!(stacks.len(), 1);
        assert_eq!(
            (
                stacks[0].stack_id,
                stacks[0].live_bytes,
                stacks[0].live_allocations
            ),
            (1, 100, 1)
        );
    }

    #[test]
    fn sampled_blocks_stand_for_what_they_sample() {
        // Large blocks are always sampled: weight 1.
        let (b, c) = sample_weight(100 << 20, 512 << 10);
        assert!((b - (100 << 20) as f64).abs() < 1.0 && (c - 1.0).abs() < 1e-9);
        // Small blocks: about R + s/2 bytes, R/s allocations.
        let (b, c) = sample_weight(64, 512 << 10);
        assert!((b - (512 << 10) as f64 - 32.0).abs() < 1.0, "{b}");
        assert!((c - 8192.5).abs() < 0.01, "{c}");
        // s = R: 1/(1 - 1/e).
        let (b, _) = sample_weight(4096, 4096);
        assert!((b - 4096.0 / (1.0 - (-1f64).exp())).abs() < 1e-6);
        // Weighted aggregation: two 64-byte samples at R = 64 KiB.
        let stacks = aggregate(
            [block(1, 64, 0), block(1, 64, 0)],
            &HashMap::new(),
            0,
            0,
            64 << 10,
        );
        assert_eq!(stacks[0].live_bytes, 2 * (64 << 10) + 64);
        assert_eq!(stacks[0].live_allocations, 2049);
    }

    #[test]
    fn clock_skew_never_underflows() {
        let stacks = aggregate([block(1, 8, 2000 * MS)], &HashMap::new(), 1000 * MS, 0, 0);
        assert_eq!(stacks[0].oldest_age_ms, 0);
    }

    #[test]
    fn kernel_data_becomes_stacks_with_addresses() {
        let data = KernelData {
            pid: 7,
            blocks: vec![block(1, 100, 0), block(1, 50, 0), block(2, 10, 0)],
            counters: HashMap::from([
                (
                    1,
                    StackCounters {
                        allocated_bytes: 500,
                        allocations: 5,
                    },
                ),
                (
                    3,
                    StackCounters {
                        allocated_bytes: 8,
                        allocations: 1,
                    },
                ),
            ]),
            allocated_bytes: 508,
            allocations: 6,
            frees: 3,
            dropped_events: 2,
            dropped: Default::default(),
        };
        assert_eq!(data.stack_ids(), vec![1, 2, 3]);
        let addrs = HashMap::from([(
            1,
            StackAddrs {
                ips: vec![0x10, 0x20],
                truncated: Some(false),
            },
        )]);
        let raw = RawSnapshot::from_kernel(data, &addrs, 1_000_000_000, 0, 0);
        assert_eq!(raw.pid, 7);
        assert_eq!((raw.allocations, raw.frees, raw.dropped_events), (6, 3, 2));
        let ids: Vec<u64> = raw.stacks.iter().map(|s| s.stack_id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(raw.stacks[0].ips, vec![0x10, 0x20]);
        assert_eq!(raw.stacks[0].truncated, Some(false));
        assert_eq!(raw.stacks[0].live_bytes, 150);
        assert!(raw.stacks[1].ips.is_empty());
        assert_eq!(raw.stacks[1].truncated, None);
    }
}
