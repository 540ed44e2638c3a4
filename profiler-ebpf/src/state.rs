//! The per-target state: whether a process is traced, and its counters.
//!
//! A process is traced while it has an entry in `TARGETS`; the entry holds
//! its totals and the counters of what could not be recorded (see
//! `heapbpf_common::drop_reason` and `heapbpf_common::info_counter`).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use heapbpf_common::{hit, info_counter, probe_cookie, TargetState, HIT_SLOTS};

use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid},
};
use heapbpf_common::config;

use crate::maps::{CONFIG, HITS, TARGETS};

/// The current thread's ids (tgid << 32 | pid) as user space numbers them:
/// the kernel's own, or, when user space lives in a pid namespace of its
/// own (`config::PIDNS_INO` set), that namespace's. A thread outside it
/// gets 0, which is no target.
#[inline(always)]
pub(crate) fn current_pid_tgid() -> u64 {
    let ino = CONFIG.get(config::PIDNS_INO).copied().unwrap_or(0);
    if ino == 0 {
        return bpf_get_current_pid_tgid();
    }
    let dev = CONFIG.get(config::PIDNS_DEV).copied().unwrap_or(0);
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `info` is a valid, writable bpf_pidns_info of the size given.
    let r = unsafe {
        bpf_get_ns_current_pid_tgid(
            dev,
            ino,
            &mut info,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    if r != 0 {
        return 0;
    }
    (u64::from(info.tgid) << 32) | u64::from(info.pid)
}

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

/// Counts a probe hit (`kind`: a `heapbpf_common::hit`) of the target whose
/// slot the probe's cookie carries. A plain add: the counter is this CPU's,
/// and a uprobe program runs with migration disabled (a task preempted in
/// between on the same CPU could lose one count; the budget does not care).
#[inline(always)]
pub(crate) fn hit(cookie: u64, kind: u32) {
    let slot = (cookie >> probe_cookie::SLOT_SHIFT) as u32;
    // Slot 0: not counted (no budget is kept for it).
    if slot == 0 || slot >= HIT_SLOTS {
        return;
    }
    if let Some(n) = HITS.get_ptr_mut(slot * hit::KINDS + kind) {
        // SAFETY: this CPU's value of a map entry, 8-byte aligned.
        unsafe { *n += 1 };
    }
}
