//! The per-target state: whether a process is traced, and its counters.
//!
//! A process is traced while it has an entry in `TARGETS`; the entry holds
//! its totals and the counters of what could not be recorded (see
//! `heapbpf_common::drop_reason` and `heapbpf_common::info_counter`).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use heapbpf_common::{info_counter, TargetState};

use crate::maps::TARGETS;

/// Adds `value` to a figure of a map value, atomically.
#[inline(always)]
pub(crate) fn add(field: &mut u64, value: u64) {
    // SAFETY: `field` points into a map value, valid and 8-byte aligned; other
    // CPUs update it concurrently, hence the atomic add. The BPF target has no
    // `AtomicU64::fetch_add`; the intrinsic lowers to BPF's atomic add (the
    // result is unused, so no fetch is needed).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field as *mut u64, value) };
}

/// Bumps counter `counter` (a `drop_reason` or an `info_counter`) of a target.
#[inline(always)]
pub(crate) fn count(state: *mut TargetState, counter: usize) {
    if counter < info_counter::COUNT {
        // SAFETY: `state` comes from a successful map lookup.
        add(unsafe { &mut (*state).counters[counter] }, 1);
    }
}

/// The state of process `tgid`, if it is traced.
#[inline(always)]
pub(crate) fn target(tgid: u32) -> Option<*mut TargetState> {
    TARGETS.get_ptr_mut(tgid)
}
