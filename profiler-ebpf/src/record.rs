//! Recording: stacks interned by hash, live blocks keyed by address with
//! their stack, the per-stack figures, and the accounting of frees.
//!
//! Both ways of taking a stack end here: the kernel's frame-pointer walk
//! ([`stack_id`]) and heapbpf's own walk (`walk.rs`, which calls [`intern`]
//! and [`record_with_stack`] when it is done).

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_stack, bpf_ktime_get_ns},
    EbpfContext,
};
use heapbpf_common::{
    alloc_slot, drop_reason, info_counter, AllocInfo, AllocKey, StackKey, StackStats, StackTrace,
    TargetState, MAX_STACK_DEPTH, NO_STACK, STACK_LEN_MASK,
};

use crate::{
    maps::{ALLOCS, SCRATCH, STACKS, STACK_STATS},
    sampling::{sample_bytes, weight},
    state::{add, count},
};

/// `EEXIST`: an insert with `BPF_NOEXIST` found the key already there (map
/// helpers return it negated).
const EEXIST: i32 = 17;

/// Takes a freed block's weight off its target's totals.
#[inline(always)]
pub(crate) fn account_free(state: *mut TargetState, info: &AllocInfo) {
    // Per stack, what is live comes from the blocks themselves (a snapshot
    // needs each block's age anyway); only the target's totals count frees.
    let (bytes, units) = weight(info.size, sample_bytes());
    // SAFETY: valid map value.
    let s = unsafe { &mut *state };
    add(&mut s.freed_bytes, bytes);
    add(&mut s.frees, units);
}

/// Captures the user stack of the current call site and interns it.
#[inline(always)]
pub(crate) fn stack_id<C: EbpfContext>(ctx: &C, state: *mut TargetState) -> u64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        count(state, drop_reason::STACK_ERROR);
        return NO_STACK;
    };
    // SAFETY: per-CPU scratch value, ours for the duration of this program.
    let buf = unsafe { &mut *buf };
    // SAFETY: `buf.ips` holds `MAX_STACK_DEPTH` u64s, the size passed;
    // `ctx` is the context this program was called with.
    let bytes = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.ips.as_mut_ptr() as *mut _,
            (MAX_STACK_DEPTH * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if bytes <= 0 {
        count(state, drop_reason::STACK_ERROR);
        return NO_STACK;
    }
    buf.len = (bytes as u64) / 8;
    intern(state, buf)
}

/// Interns `trace` (length and flags in `len`) by an FNV-1a hash of its
/// addresses; returns the stack id, or [`NO_STACK`] when the map is full.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "`STACKS.get(hash)` changes the code LLVM emits for every program that records; not measured against the verifier"
)]
pub(crate) fn intern(state: *mut TargetState, trace: &StackTrace) -> u64 {
    let len = trace.len & STACK_LEN_MASK;
    // 0 is reserved for "no stack".
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_STACK_DEPTH {
        if i as u64 >= len {
            break;
        }
        hash = (hash ^ trace.ips[i]).wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ trace.len).wrapping_mul(0x0100_0000_01b3);
    if hash == NO_STACK {
        hash = 1;
    }
    // Most stacks are known: a lookup takes no lock, an insert does.
    // SAFETY: only tests presence; the value is not read.
    if unsafe { STACKS.get(&hash) }.is_some() {
        return hash;
    }
    match STACKS.insert(hash, trace, BPF_NOEXIST as u64) {
        Ok(()) => hash,
        Err(e) if e == -EEXIST => hash, // already interned
        Err(_) => {
            count(state, drop_reason::STACKS_FULL);
            NO_STACK
        }
    }
}

/// Records a new live block of `size` bytes at `addr` allocated by the
/// interned stack `stack_id`.
#[inline(always)]
pub(crate) fn record_with_stack(
    state: *mut TargetState,
    tgid: u32,
    addr: u64,
    size: u64,
    stack_id: u64,
) {
    let key = AllocKey {
        tgid,
        slot: alloc_slot::LIVE,
        addr,
    };
    let info = AllocInfo {
        size,
        stack_id,
        // SAFETY: the helper takes no arguments and touches no memory of ours.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    match ALLOCS.insert(key, info, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            // A block still recorded at this address was freed by a
            // path heapbpf does not see; retire it so its stack does not
            // grow forever.
            // SAFETY: `ALLOCS` is not preallocated: an entry removed meanwhile is
            // not reused while this program runs; the value is copied out at once.
            if let Some(stale) = (unsafe { ALLOCS.get(key) }).copied() {
                // SAFETY: valid map value.
                if stale.timestamp_ns < unsafe { (*state).image_ns } {
                    // The image before an exec had a block here (the
                    // address space was not randomized): set it aside for
                    // that image's last snapshot.
                    let aside = AllocKey {
                        slot: alloc_slot::ASIDE,
                        ..key
                    };
                    if ALLOCS.insert(aside, stale, 0).is_err() {
                        count(state, drop_reason::ALLOCS_FULL);
                    }
                } else {
                    account_free(state, &stale);
                    count(state, info_counter::STALE_REPLACED);
                }
            }
            if ALLOCS.insert(key, info, 0).is_err() {
                count(state, drop_reason::ALLOCS_FULL);
                return;
            }
        }
        Err(_) => {
            count(state, drop_reason::ALLOCS_FULL);
            return;
        }
    }
    let (bytes, units) = weight(size, sample_bytes());
    // SAFETY: valid map value.
    let s = unsafe { &mut *state };
    add(&mut s.allocated_bytes, bytes);
    add(&mut s.allocations, units);
    let skey = StackKey {
        tgid,
        generation: s.generation as u32,
        stack_id,
    };
    let stats = match STACK_STATS.get_ptr_mut(skey) {
        Some(stats) => stats,
        None => {
            let _ = STACK_STATS.insert(skey, StackStats::default(), BPF_NOEXIST as u64);
            match STACK_STATS.get_ptr_mut(skey) {
                Some(stats) => stats,
                None => {
                    count(state, drop_reason::STATS_FULL);
                    return;
                }
            }
        }
    };
    // SAFETY: valid map value.
    let stats = unsafe { &mut *stats };
    add(&mut stats.allocated_bytes, bytes);
    add(&mut stats.allocations, units);
}
